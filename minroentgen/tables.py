"""CSV and JSON Lines tables, plain or .gz, read with one-line errors that name the file: the
MIMIC-CXR-JPG and MIMIC-IV tables, Open-I view tables, and the csv/jsonl layout of data.py.
"""
import csv
import gzip
import json
import zlib
from pathlib import Path


def open_text(path: Path):
    # utf-8-sig: spreadsheet programs start a CSV with a byte-order mark
    return (gzip.open(path, "rt", newline="", encoding="utf-8-sig") if path.suffix == ".gz"
            else open(path, newline="", encoding="utf-8-sig"))


def read_csv(path: Path, columns=(), what="") -> list[dict]:
    """Rows of a .csv(.gz); a missing, damaged or half-downloaded file or a missing column is a
    one-line ValueError naming the file (what: how to get it right)."""
    if not path.is_file():
        raise ValueError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}; "
                         f"{what or 'give a CSV file'}")
    try:
        with open_text(path) as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, EOFError, zlib.error, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}): damaged or half-downloaded? "
                         f"download it again") from None
    for need in columns:  # a name, or a list of names one of which will do
        options = [need] if isinstance(need, str) else need
        if not set(options) & set(reader.fieldnames or ()):
            raise ValueError(f"{path} has no column {' or '.join(map(repr, options))}"
                             f"{'; ' + what if what else ''}")
    return rows


def csv_rows(path: Path):
    """The header, then every row (a list) of a .csv(.gz), read as a stream (MIMIC-IV's tables
    are large); a damaged file is a one-line ValueError."""
    try:
        with open_text(path) as f:
            yield from csv.reader(f)
    except (OSError, EOFError, zlib.error, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}): damaged or half-downloaded? "
                         f"download it again") from None


def _json_lines(path: Path, lines) -> list:
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg}); each line must be one "
                             'object, {"image": "a.png", "report": "..."}') from None
    return rows


def read_rows(path: Path) -> list:
    """The rows of a .csv (dicts) or .jsonl (JSON values) file, optionally .gz."""
    try:
        with open_text(path) as f:
            return _json_lines(path, f) if ".jsonl" in path.suffixes else list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                         "save it as UTF-8") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}): "
                         "damaged or cut short?") from None
