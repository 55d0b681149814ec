"""Where checkpoints and tokens come from: the embedded tiny suite (training), the
Hugging Face hub (downloads, the Pile), checkpoint files, schedules and the download plan.

Rules: ``workflow/rules/tiny.smk``, ``workflow/rules/hub.smk``. Imports nothing downstream.
"""
