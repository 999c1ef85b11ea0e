"""`synthetic-triage`: a generated, clearly SYNTHETIC demo task (no real patients).

Templated emergency-department notes -> triage label (routine / urgent / emergency).
Each site writes in its own style (abbreviations, phrasing), has its own label mix, and
about 5% of labels are flipped, so the task has real but imperfect signal.
"""

from __future__ import annotations

import random

LABELS = ("routine", "urgent", "emergency")

_COMPLAINTS = {
    "routine": ["a medication refill request", "mild seasonal allergies",
                "a minor skin rash on the arm", "follow-up of controlled blood pressure",
                "an ankle sprain two weeks ago, walking normally", "a routine physical",
                "occasional mild heartburn", "a request for a sick note"],
    "urgent": ["fever of 39C and a productive cough", "painful urination and flank pain",
               "a deep laceration on the forearm", "moderate abdominal pain and vomiting",
               "worsening asthma, using the inhaler every hour", "a swollen hot knee",
               "a possible wrist fracture after a fall", "severe migraine with vomiting"],
    "emergency": ["crushing chest pain radiating to the left arm",
                  "sudden facial droop and slurred speech",
                  "severe shortness of breath, lips turning blue",
                  "unresponsive after a fall with a head injury",
                  "heavy bleeding that will not stop", "a seizure lasting ten minutes",
                  "anaphylaxis after a bee sting", "vomiting blood"],
}
_VITALS = {"routine": (60, 85, 115, 135), "urgent": (85, 110, 100, 150),
           "emergency": (110, 150, 70, 190)}
_HISTORY = ["no known allergies", "history of type 2 diabetes", "smoker", "lives alone",
            "history of hypertension", "no significant history", "on anticoagulants",
            "recently returned from travel"]
# Per-site writing styles: (phrase replacements, opening).
_STYLES = [
    ({}, "{age}-year-old {sex} presenting with {complaint}."),
    ({"shortness of breath": "SOB", "chest pain": "CP", "blood pressure": "BP",
      "history of": "hx", "abdominal": "abd"}, "{age}yo {sex_short} c/o {complaint}."),
    ({"presenting": "seen", "severe": "marked", "moderate": "significant"},
     "Pt ({sex}, {age}) reports {complaint}."),
]
_LABEL_MIX = [(0.5, 0.3, 0.2), (0.2, 0.5, 0.3), (0.3, 0.2, 0.5)]


def generate_site(site: int, num_records: int, seed: int,
                  label_noise: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic notes and labels of one site (depends on seed and site only)."""
    rng = random.Random(f"{seed}:{site}")
    replacements, opening = _STYLES[site % len(_STYLES)]
    mix = _LABEL_MIX[site % len(_LABEL_MIX)]
    texts, labels = [], []
    for _ in range(num_records):
        label = rng.choices(LABELS, weights=mix)[0]
        # 15% of notes mention a complaint typical of a neighbouring class.
        pool = label if rng.random() < 0.85 else rng.choice(
            [x for x in LABELS if x != label])
        hr_lo, hr_hi, bp_lo, bp_hi = _VITALS[label]
        sex = rng.choice(["male", "female"])
        text = " ".join([
            opening.format(age=rng.randint(18, 90), sex=sex, sex_short=sex[0].upper(),
                           complaint=rng.choice(_COMPLAINTS[pool])),
            f"HR {rng.randint(hr_lo, hr_hi)}, blood pressure {rng.randint(bp_lo, bp_hi)}.",
            rng.choice(_HISTORY).capitalize() + ".",
        ])
        for old, new in replacements.items():
            text = text.replace(old, new)
        if rng.random() < label_noise:
            label = rng.choice(LABELS)
        texts.append(text)
        labels.append(label)
    return texts, labels
