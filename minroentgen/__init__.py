"""minroentgen: RoentGen (Stable Diffusion fine-tuned on chest X-rays) from scratch.

Read it in the order the data flows, each file next to its paper:

    1. tokenizer.py       report -> 77 token ids       CLIP (Radford et al. 2021, Sec. 2.4), BPE
    2. clip.py            ids -> context (B, 77, 768)  CLIP's text transformer; LDM Sec. 3.3
    3. unet.py            eps_theta(z_t, t, context)    LDM (Rombach et al. 2022) Sec. 3.3, Fig. 3;
                                                        DDPM (Ho et al. 2020) App. B
    4. vae.py             image <-> latents             LDM Sec. 3.1, App. G
    5. noise_schedule.py  abar_t, q(z_t | z_0), targets DDPM eqs. 4, 14; v (Salimans & Ho 2022);
                                                        zero terminal SNR (Lin et al. 2024)
    6. schedulers.py      z_t -> z_prev samplers        DDPM eqs. 6-7, DDIM eq. 12, PNDM eqs. 9, 12
    7. pipeline.py        prompt -> image               guidance (Ho & Salimans 2022, eq. 6)
    8. training.py        the fine-tuning objective     DDPM Alg. 1, LDM Eq. 3; RoentGen's Methods
       optimization.py    EMA, precision, lr schedule   LDM's LitEma; SGDR (Loshchilov & Hutter 2017)
       checkpoints.py     a run's folder, resume
       trainer.py         the training loop (DDP)       RoentGen's Methods
       data.py            image-report pairs            MIMIC-CXR, Open-I, CSV/JSONL
       tables.py          CSV/JSONL tables, .gz or not
       mimic_iv.py        age, sex, race of a patient   MIMIC-IV hosp/patients, admissions
       report_text.py     a report's impression         MIMIC-CXR's section parser
       prompts.py         demographic prompt templates  RoentGen-v2 (Moroianu et al. 2025)
       dataset.py         pairs -> training examples    RoentGen's Methods (512 px, 77 tokens)
    9. metrics.py         FID, MS-SSIM                  Heusel et al. 2017; Wang et al. 2003

Plumbing, to read when needed: configs.py (the config.json of each model, as dataclasses),
weights.py and layouts.py (checkpoint files in diffusers' and the original CompVis naming).
Comments marked (parity) or (speed) exist only to match diffusers bit for bit or to run faster:
skip them on a first read. phantoms/ is the offline world that stands in for MIMIC-CXR
(procedural X-rays, their reports, a reader that judges samples); it is not part of the model.
"""
