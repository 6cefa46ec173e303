"""The offline world: procedural chest X-ray phantoms that stand in for MIMIC-CXR, and their judge.

Not part of the model. Real weights and images cannot be downloaded here, so the project trains and
checks its text-to-image models on pictures whose labels say exactly what they show:

    anatomy.py   patient, pixel grid in patient coordinates, lungs, vessels, bones
    findings.py  one drawing function per finding (effusion, pneumothorax, nodule, devices, ...)
    classic.py   the classic report style: labels -> an impression in many phrasings (frozen)
    clinical.py  the clinical report style: constructions of real impressions (issue 30)
    reports.py   the report writer: labels -> an impression in either style, or a mix
    phantom.py   labels, render, the data set writer (`python -m minroentgen.phantoms --out DIR`)
    reader.py    a small CNN that reads findings off a phantom: the radiologist of the evaluation
    demographics.py          opt-in age, sex (and an invisible race) of a phantom patient, and their signs
    demographic_reader.py    a CNN of the same shape that reads sex and age (its own weights)
    demographic_fidelity.py  evaluate.py --demographics: sex and age of samples vs their prompts
    judge.py     text control: prompts, samples, what the reader sees, FID and MS-SSIM per group
    openi.py     real Open-I impressions with phantom labels from their MeSH terms (a benchmark)
"""
