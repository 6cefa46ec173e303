"""MIMIC-CXR report text -> the impression RoentGen trains on, by the rules of the dataset's own
section parser (MIT-LCP/mimic-cxr, txt/); and the reports themselves, read from
mimic-cxr-reports.zip in place or from the folder it unpacks to. data.py turns them into pairs.
"""
import re
import zipfile
import zlib
from pathlib import Path

REPORTS_HINT = ("MIMIC-CXR-JPG holds no reports: download mimic-cxr-reports.zip from MIMIC-CXR "
                "v2.0.0 (physionet.org/content/mimic-cxr/2.0.0/) and pass it, or the folder it "
                "unpacks to, as --reports")


def clean(text: str) -> str:
    """Every run of whitespace (newlines included) -> one space."""
    return " ".join(text.split())


# A section heading, as MIMIC-CXR's own section parser (MIT-LCP/mimic-cxr, txt/) finds them:
# a line starting with one space, then capitals, then a colon: "\n IMPRESSION: ".
HEADING = re.compile(r"\n ([A-Z ()/,-]+):\s")
# Heading names that the dataset's parser renames (typos included) beyond the rules of section_kind.
RENAMED = {"conclusion": "impression", "ndication": "impression", "reference exam": "comparison",
           **dict.fromkeys(("impresson", "imprression", "imoression", "impressoin", "imprssion",
                            "impresion", "imperssion", "mpression", "impession"), "impression"),
           **dict.fromkeys(("finding", "findins", "findindgs", "findgings", "findngs", "findnings",
                            "finidngs"), "findings"),
           **dict.fromkeys(("comparision", "comparsion", "comparrison", "comparisions"),
                           "comparison")}
# Headings that name the view ("CHEST, PA AND LATERAL:", "PORTABLE AP VIEW:") introduce findings.
VIEW_HEADING = re.compile(r"chest|portable|pa and lat|lateral and pa|ap and lateral|lateral and ap|"
                          r"frontal and|two views|frontal view|pa view|ap view|one view|"
                          r"lateral view|bone window|frontal upright|frontal semi-upright|ribs")


def section_kind(heading: str) -> str:
    """Normalised section name: "FINDINGS AND IMPRESSION" -> "impression", "CONCLUSION" ->
    "impression", "CHEST, TWO VIEWS" -> "findings", "CLINICAL HISTORY" -> "history"."""
    name = heading.lower().strip()
    if name in RENAMED:
        return RENAMED[name]
    for kind in ("impression", "findings", "history", "comparison", "addendum"):
        if kind in name:
            return kind
    return "findings" if VIEW_HEADING.search(name) else name


def report_sections(text: str) -> list[tuple[str, str]]:
    """A MIMIC-CXR report -> [(normalised name, text)], starting with the "preamble" before the
    first heading, or [("full report", text)] when there is no heading."""
    m = HEADING.search(text)
    if m is None:
        return [("full report", text)]
    sections = [("preamble", text[: m.start(1)])]
    while m:
        start = m.end()
        line_end = text.find("\n", start)  # look for the next heading after this line only
        following = HEADING.search(text, start if line_end == -1 else line_end)
        sections.append((section_kind(m.group(1)),
                         text[start: following.start() if following else len(text)]))
        m = following
    return sections


def extract_impression(text: str) -> str:
    """The prompt RoentGen trains on, by the rules of MIMIC-CXR's own parser: empty impression and
    findings sections are dropped; if neither kind is left, the last section's paragraphs after its
    first (paragraphs end at a "\\n \\n" line) are the "last paragraph"; then the last section of
    the first kind present among impression, findings, last paragraph, comparison wins; else "".
    (The parser's hand-written exceptions for a few hundred named studies are not applied.)"""
    sections = [(name, body) for name, body in report_sections(text)
                if name not in ("impression", "findings") or body.strip()]
    names = [name for name, _ in sections]
    if "impression" not in names and "findings" not in names and "\n \n" in sections[-1][1]:
        sections.append(("last paragraph", "\n \n".join(sections[-1][1].split("\n \n")[1:])))
    for kind in ("impression", "findings", "last paragraph", "comparison"):
        bodies = [body for name, body in sections if name == kind]
        if bodies:
            return clean(bodies[-1])
    return ""


class MimicReports:
    """MIMIC-CXR's report texts by study id, from mimic-cxr-reports.zip (read in place, never
    unpacked: the data folder is often a read-only mount) or from a folder holding
    files/pXX/pNNNNNNNN/sNNNNNNNN.txt (or the pXX folders themselves)."""
    NAME = re.compile(r"(?:^|/)p\d\d/p\d+/s(\d+)\.txt$")

    def __init__(self, path: Path):
        self.path, self.zip = path, None
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"--reports {path}: not a readable zip ({e}); download "
                                 "mimic-cxr-reports.zip again (half-downloaded?) or give the "
                                 "folder it unpacks to") from None
            self.members = {m.group(1): name for name in self.zip.namelist()
                            if (m := self.NAME.search(name))}
        elif path.is_dir():
            self.base = path / "files" if (path / "files").is_dir() else path
        else:
            raise ValueError(f"--reports {path} does not exist; {REPORTS_HINT}")

    def text(self, subject: str, study: str) -> str | None:
        """The report of a study, or None when there is none."""
        if self.zip is not None:
            name = self.members.get(study)
            try:
                return (None if name is None
                        else self.zip.read(name).decode("utf-8", errors="replace"))
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                raise ValueError(f"--reports {self.path}: {name} is damaged ({e}); download "
                                 "mimic-cxr-reports.zip again") from None
        path = self.base / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        return path.read_text(errors="replace") if path.is_file() else None
