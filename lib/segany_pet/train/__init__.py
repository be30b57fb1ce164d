"""Training the 3D SAM: records and crops (data), SAM-style click simulation and loss (simulate), the trainer
with checkpoints, resume, validation and progress (trainer), Cross-Prompt Confidence Learning (cpcl), the fast
loop on cached embeddings (fast), and torchrun support (distributed). `make_trainer` picks the trainer a
TrainConfig's ``method`` and ``fast`` name."""

from segany_pet.agreement import confidence_targets
from segany_pet.train.cpcl import CPCLTrainer, FastCPCLTrainer, noise_report
from segany_pet.train.data import (
    TIERS,
    CropSample,
    CropSampler,
    TrainingCase,
    TrainingDataError,
    TrainingObject,
    check_records,
    load_case,
    load_cases,
    records_from_datastore,
    records_from_folder,
)
from segany_pet.train.distributed import DistributedContext, start_distributed
from segany_pet.train.fast import FastTrainer
from segany_pet.train.simulate import InteractiveStep, Prompt, first_prompt, segmentation_loss
from segany_pet.train.trainer import (
    CHECKPOINT_LAST,
    KEY_METRIC,
    MODEL_BEST,
    TRAIN_STATS,
    TrainConfig,
    Trainer,
    learning_rate_factor,
    split_records,
)


def make_trainer(config: TrainConfig | dict, records, val_records=None, **callbacks) -> Trainer:
    """The trainer for ``config.method`` and ``fast``: Trainer or FastTrainer ("plain"), CPCLTrainer or
    FastCPCLTrainer ("cpcl"). ``crop_store`` (fast trainers): see `EncodedCrops`."""
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if config.method == "cpcl":
        trainer_class = FastCPCLTrainer if config.fast else CPCLTrainer
    else:
        trainer_class = FastTrainer if config.fast else Trainer
    return trainer_class(config, records, val_records, **callbacks)


__all__ = [
    "CPCLTrainer",
    "FastCPCLTrainer",
    "confidence_targets",
    "make_trainer",
    "noise_report",
    "CHECKPOINT_LAST",
    "KEY_METRIC",
    "MODEL_BEST",
    "TIERS",
    "TRAIN_STATS",
    "CropSample",
    "CropSampler",
    "DistributedContext",
    "FastTrainer",
    "InteractiveStep",
    "Prompt",
    "TrainConfig",
    "Trainer",
    "TrainingCase",
    "TrainingDataError",
    "TrainingObject",
    "check_records",
    "first_prompt",
    "learning_rate_factor",
    "load_case",
    "load_cases",
    "records_from_datastore",
    "records_from_folder",
    "segmentation_loss",
    "split_records",
    "start_distributed",
]
