"""Prompt templates: the report with the patient in front of it, as RoentGen-v2 trains.

RoentGen-v2 (Moroianu et al. 2025, arXiv 2508.16783) fine-tunes SD 2.1-base on prompts
"{age} year old {RACE} {female|male}. {impression}", e.g. "86 year old BLACK female. No evidence
of acute cardiopulmonary process ." (its public demo prompt table,
demo_data/demo_inference_prompts.csv, has the columns gender F/M, anchor_age and race; its prompts
write anchor_age as the age, the race in capitals as one word, WHITE, BLACK, ASIAN or HISPANIC, and
F/M as female/male), cut to 77 tokens.

`fill(template, fields)` makes one prompt; a field is a column of a CSV/JSONL table or, for
MIMIC-CXR, the patient's row of MIMIC-IV (data.read_mimic_iv). Three fields are normalised so that
every source writes them alike:
  age   a whole number of years (a fraction is cut: 64.9 -> 64); read from `age`, else `anchor_age`
        (MIMIC-IV's age in the patient's anchor year, 91 for all older than 89; RoentGen-v2 writes
        it as the age, not the age at the study).
  sex   female or male; read from `sex`, else `gender`: F, female, woman -> female; M, male,
        man -> male (any case). Anything else is unknown.
  race  one of WHITE, BLACK, ASIAN, HISPANIC, OTHER, read from `race`. The public code does not say
        how MIMIC-IV's 33 race strings became RoentGen-v2's words; this rule is chosen: a string
        starting with WHITE, BLACK, ASIAN or HISPANIC (any case) is that word, AFRICAN AMERICAN is
        BLACK, LATINO and SOUTH AMERICAN are HISPANIC; UNKNOWN, UNABLE TO OBTAIN, PATIENT DECLINED
        TO ANSWER and blanks are unknown; anything else (AMERICAN INDIAN/ALASKA NATIVE, NATIVE
        HAWAIIAN OR OTHER PACIFIC ISLANDER, MULTIPLE RACE/ETHNICITY, PORTUGUESE, OTHER) is OTHER.
A field that is blank or unknown is None: the pair is skipped and counted ("missing race").
"""
import math
import string

V2_TEMPLATE = "{age} year old {race} {sex}. {report}"
RACES = ("WHITE", "BLACK", "ASIAN", "HISPANIC", "OTHER")
UNKNOWN_RACES = {"UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER", "DECLINED TO ANSWER",
                 "NOT SPECIFIED", "UNKNOWN/NOT SPECIFIED", "NAN", "NONE", "N/A"}
SEXES = {"F": "female", "FEMALE": "female", "WOMAN": "female",
         "M": "male", "MALE": "male", "MAN": "male"}
# field -> the columns it is read from, the first present one wins
SOURCES = {"age": ("age", "anchor_age"), "sex": ("sex", "gender"), "race": ("race",)}
WHERE = ("age, sex and race come from a CSV/JSONL table's columns (age or anchor_age, sex or "
         "gender, race) or, for MIMIC-CXR, from MIMIC-IV with --demographics")


def text(value) -> str | None:
    """A table cell as text; blank (or None) -> None."""
    value = "" if value is None else str(value).strip()
    return value or None


def age(value) -> str | None:
    """Whole years, "0" to "150", or None (blank, not a number, out of range)."""
    try:
        years = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return str(math.floor(years)) if 0 <= years <= 150 else None  # NaN fails both tests


def sex(value) -> str | None:
    return SEXES.get(str(value or "").strip().upper())


def race(value) -> str | None:
    """A race string (MIMIC-IV's admissions.race, or any table's) -> one of RACES, or None."""
    s = " ".join(str(value or "").upper().split())
    if not s or s in UNKNOWN_RACES:
        return None
    for word in RACES[:4]:
        if s.startswith(word):
            return word
    if s.startswith("AFRICAN AMERICAN"):
        return "BLACK"
    if s.startswith(("LATINO", "SOUTH AMERICAN")):
        return "HISPANIC"
    return "OTHER"


def table_fields(row: dict, columns) -> dict:
    """A CSV/JSONL row -> its fields: every column but image and report as text (None when blank),
    then age, sex and race normalised from their source columns (None when unknown) where the table
    has one."""
    fields = {c: text(row.get(c)) for c in columns if c not in ("image", "report")}
    for name, normalise in (("age", age), ("sex", sex), ("race", race)):
        source = next((c for c in SOURCES[name] if c in columns), None)
        if source is not None:
            fields[name] = normalise(row.get(source))
    return fields


def patient_race(admissions) -> str | None:
    """One race for a patient from (admittime, race string) of each admission: the most frequent
    known race (after `race`); a tie goes to the race of the latest admission among the tied ones,
    then to the alphabetically first. None when no admission knows it."""
    count, latest = {}, {}
    for when, value in admissions:
        r = race(value)
        if r is not None:
            count[r] = count.get(r, 0) + 1
            latest[r] = max(latest.get(r, ""), when or "")
    if not count:
        return None
    tied = [r for r in count if count[r] == max(count.values())]
    last = max(latest[r] for r in tied)
    return min(r for r in tied if latest[r] == last)


def template_fields(template: str) -> list[str]:
    """The field names of a template, in order; a one-line ValueError for anything but plain
    {name} fields."""
    if not template or not template.strip():
        raise ValueError("--prompt-template is empty; e.g. " + repr(V2_TEMPLATE))
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"--prompt-template {template!r}: {e}; write {{{{ and }}}} for a literal "
                         "brace") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "") + \
                    (f":{spec}" if spec else "") + "}"
            raise ValueError(f"--prompt-template {template!r}: {field} is not a plain named field; "
                             f"write fields as {{name}}, e.g. {V2_TEMPLATE!r}")
        if name not in names:
            names.append(name)
    return names


def check_template(template: str, available) -> list[str]:
    """The template's field names, all of them among `available` ("report" always is); else a
    one-line ValueError naming the unknown ones and listing the available ones."""
    names = template_fields(template)
    available = ["report", *(a for a in available if a != "report")]
    unknown = [n for n in names if n not in available]
    if unknown:
        def braced(names):
            return ", ".join("{" + n + "}" for n in names)
        raise ValueError(f"--prompt-template uses {braced(unknown)}, which this data lacks; "
                         f"available: {braced(available)} ({WHERE})")
    return names


def fill(template: str, fields: dict) -> str:
    """The prompt: the template with each {name} replaced by fields[name] (checked beforehand, see
    `check_template`, and not None)."""
    return template.format_map(fields)
