"""A phantom patient's age, sex and race, and how age and sex show on the radiograph (opt-in).

RoentGen-v2 (Moroianu et al. 2025, arXiv 2508.16783) writes the patient's age, race and sex in
front of each impression ("86 year old BLACK female. ..."). With `phantom.make(...,
demographics=True)` a phantom patient has them too, and phantom.render draws what a radiologist
would see of them on a PA film:
  sex   female: breast soft-tissue shadows, a symmetric pair of rounded densities over both lower
        zones, lateral, densest near their curved inferior margin and fading upwards (the normal
        breast shadow of a female PA chest film; standard chest radiograph anatomy). Male: none.
  age   t = (age - 20) / 70, from 0 at 20 to 1 at 90:
        - the aorta unfolds: a larger, higher aortic knob on the patient's left and the ascending
          aorta bulging the right upper mediastinal border (aortic unfolding and tortuosity are
          the usual ageing changes of the mediastinum on chest radiographs), some people more
          than others (Person.aorta);
        - the bones are less dense (age-related osteopenia, more in women after the menopause):
          ribs, clavicles and spine keep about 1 - 0.3 t of their density, women 0.1 less again by
          90, with each person's own peak density and rate of loss (Person.bone, Person.loss);
        - the heart is somewhat larger: the cardiothoracic ratio moves up WITHIN the normal range,
          never past 0.50, the usual PA threshold of cardiomegaly (the phantoms' normal hearts have
          0.40-0.50, the cardiomegaly label 0.58-0.68), so it is not read as cardiomegaly.
  race  one of RoentGen-v2's words (prompts.RACES, uniformly), only so that its template can be
        filled: it changes NOTHING in the picture. Phantoms have no visible race and no reader
        here reads one.
The person is drawn from a random stream of its own (phantom.make), so a phantom's labels, report
and anatomy are those of the same seed and index without demographics; only these signs differ.
"""
from dataclasses import dataclass, replace

import numpy as np

from ..prompts import RACES
from .anatomy import Grid, Patient, soft

AGES = (20, 90)  # uniform, whole years
SEXES = ("female", "male")


@dataclass(frozen=True)
class Person:
    age: int       # years, AGES
    sex: str       # "female" or "male"
    race: str      # one of prompts.RACES; not visible
    breast: float  # size of the breast shadows, 0.7-1.3 (ignored for men)
    aorta: float = 1.0  # how fast this person's aorta unfolds, 0.5-1.5
    bone: float = 1.0   # this person's peak bone density, 0.9-1.1
    loss: float = 1.0   # how fast this person loses it, 0.6-1.4

    def __post_init__(self):
        if self.sex not in SEXES:
            raise ValueError(f"sex must be female or male, got {self.sex!r}")
        if not AGES[0] <= self.age <= AGES[1]:
            raise ValueError(f"a phantom's age must be from {AGES[0]} to {AGES[1]}, got {self.age!r}")

    @property
    def t(self) -> float:
        """Ageing from 0 (20 years) to 1 (90 years)."""
        return (self.age - AGES[0]) / (AGES[1] - AGES[0])

    def fields(self) -> dict:
        """The CSV columns (and prompt template fields) age, sex and race."""
        return {"age": str(self.age), "sex": self.sex, "race": self.race}


def sample_person(rng: np.random.Generator, age=None, sex=None, race=None) -> Person:
    """A random person; age, sex or race, when given, are used instead of drawn (the same draws
    are made either way). People of one age differ (aorta, bone, loss), so that age is not
    read exactly off the picture, as it is not off real radiographs."""
    a, s = int(rng.integers(AGES[0], AGES[1] + 1)), SEXES[int(rng.integers(2))]
    r, breast = RACES[int(rng.integers(len(RACES)))], float(rng.uniform(0.7, 1.3))
    aorta, bone, loss = rng.uniform(0.5, 1.5), rng.uniform(0.9, 1.1), rng.uniform(0.6, 1.4)
    return Person(a if age is None else int(age), s if sex is None else sex,
                  r if race is None else race, breast, float(aorta), float(bone), float(loss))


def aged_heart(p: Patient, person: Person) -> Patient:
    """The patient with a larger normal heart for the age: the normal CTR's place x in 0.40-0.50
    moves to 1 - (1 - x)(1 - 0.6 t); at 90 the CTR is 0.46-0.50. The enlarged heart is unchanged."""
    x = (p.ctr_normal - 0.40) / 0.10
    return replace(p, ctr_normal=0.40 + 0.10 * (1 - (1 - x) * (1 - 0.6 * person.t)))


def aortic_knob(v: np.ndarray, person: Person) -> np.ndarray:
    """How far the mediastinum's left border bulges out at the aortic arch: the phantom's knob
    (0.06 at v = -0.33) growing, rising and lengthening with age (unfolding)."""
    t = min(person.t * person.aorta, 1.2)
    return (0.06 + 0.07 * t) * np.exp(-(((v + 0.33 + 0.04 * t) / (0.08 + 0.04 * t)) ** 2))


def ascending_aorta(v: np.ndarray, person: Person) -> np.ndarray:
    """How far the unfolded ascending aorta bulges the right upper mediastinal border."""
    return 0.05 * min(person.t * person.aorta, 1.2) * np.exp(-(((v + 0.15) / 0.12) ** 2))


def bone_density(person: Person) -> float:
    """Factor on bone density: at 20 the person's peak (0.9-1.1); by 90 an average man has lost
    0.3 of it, an average woman 0.4 (0.1 more after 50); each person at their own rate."""
    menopause = 0.1 * np.clip((person.age - 50) / 40, 0, 1) if person.sex == "female" else 0.0
    return float(person.bone * (1 - person.loss * (0.3 * person.t + menopause)))


def breast_shadows(g: Grid, p: Patient, person: Person) -> np.ndarray:
    """Soft-tissue density (size, size) of both breasts, 0 for men: rounded, over the lower zones,
    centred lateral to each lung's centre, with a crisp curved inferior margin and a density that
    fades upwards; a little lower with age (ptosis). Placed laterally enough that the phantom
    reader does not take them for consolidation or a large heart (nearer the midline, 7% of young
    women's phantoms were read as consolidation)."""
    if person.sex != "female":
        return np.zeros_like(g.u)
    out = np.zeros_like(g.u)
    cv, rv, ru = p.dome_right - 0.15 + 0.06 * person.t, 0.30 * person.breast ** 0.5, 0.30
    for s in (-1.0, 1.0):
        du, dv = (g.u - s * (p.lung_cx + 0.18)) / ru, (g.v - cv) / rv
        out += soft(1 - np.hypot(du, dv), 0.04) * np.clip(0.55 + 0.6 * dv, 0, 1)
    return 0.28 * person.breast * out


GRID_AGES = (25, 45, 65, 85)


def write_grid(path, size: int = 256, seed: int = 0):
    """One normal patient (the same anatomy throughout) at GRID_AGES, as a woman and as a man
    (the README's figure)."""
    from PIL import Image, ImageDraw, ImageFont

    from .phantom import check_size, render  # phantom imports this module
    check_size(size)
    font, pad = ImageFont.load_default(), 18
    sheet = Image.new("L", (len(GRID_AGES) * size, 2 * (size + pad) + pad), 255)
    draw = ImageDraw.Draw(sheet)
    title = "one normal patient, aged and as either sex (race is not drawn)"
    draw.text((4, 3), title, fill=0, font=font)
    for i, sex in enumerate(SEXES):
        for j, age in enumerate(GRID_AGES):
            person = Person(age, sex, RACES[0], 1.0)
            x, y = j * size, pad + i * (size + pad)
            img = render({}, size, np.random.default_rng([seed, 0]), person)
            sheet.paste(Image.fromarray(img), (x, y + pad))
            draw.text((x + 4, y + 3), f"{age} year old {sex}", fill=0, font=font)
    sheet.save(path)
