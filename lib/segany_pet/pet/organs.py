"""The organ vocabulary: label values and names of the organs a whole-body PET label map may hold (the phantom's
organ maps, and the organ targets of curated datasets)."""

ORGAN_NAMES: dict[int, str] = {
    1: "muscle",  # all soft tissue that is not a named organ
    2: "fat",  # subcutaneous
    3: "brain",
    4: "lung_left",
    5: "lung_right",
    6: "heart_myocardium",  # left-ventricular wall
    7: "heart_blood",  # cardiac chambers
    8: "aorta",
    9: "liver",
    10: "spleen",
    11: "kidney_left",
    12: "kidney_right",
    13: "renal_pelvis",  # collecting systems, urine-filled
    14: "bladder",
    15: "bowel",
    16: "bone_marrow",
    17: "salivary_glands",
    18: "lacrimal_glands",
}
ORGAN_LABELS: dict[str, int] = {name: value for value, name in ORGAN_NAMES.items()}
