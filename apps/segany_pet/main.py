"""SegAnyPET Label: the MONAI Label app. Wires library pieces to the server; the work is in segany_pet."""

import logging
import math
import os
import threading
from pathlib import Path

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import segany_pet
from segany_pet.errors import UnknownImageError, UserInputError
from segany_pet.label.activelearning import (
    CrossPromptScoring,
    disagreement_strategy,
    diverse_disagreement_strategy,
    label_review_strategy,
)
from segany_pet.label.datastore import PETDatastore, checked_name
from segany_pet.label.dicom_studies import import_dicom_series
from segany_pet.label.dicom_studies import summary as dicom_import_summary
from segany_pet.label.dicomweb import PETDICOMWebDatastore, dicomweb_client, serve_confined_dicomweb_proxy
from segany_pet.label.infer import (
    DEFAULT_EDGE,
    LESION_LABELS,
    AnnotationSessions,
    PromptableSegmentationInfer,
    SUVThresholdInfer,
)
from segany_pet.label.models import DEFAULT_EMBEDDING_CACHE_MB, PROMPTABLE, STATE_DIR, served_model_for
from segany_pet.label.prewarm import Prewarmer
from segany_pet.label.train import PromptableTrainTask
from segany_pet.pet import VolumeCache

logger = logging.getLogger(__name__)


def conf_number(conf: dict, key: str, default: float, low: float, high: float) -> float:
    """A numeric app option within [low, high]; a clear error at start instead of a server that misbehaves."""
    try:
        value = float(conf.get(key, default))
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # NaN fails too
        raise UserInputError(f"--conf {key} must be a number from {low:g} to {high:g}, not {conf.get(key)!r}")
    return value


def conf_flag(conf: dict, key: str, default: bool) -> bool:
    """A true/false app option; a clear error at start for anything else."""
    value = str(conf.get(key, default)).lower()
    if value not in ("true", "false"):
        raise UserInputError(f"--conf {key} must be true or false, not {conf.get(key)!r}")
    return value == "true"


class SegAnyPETApp(MONAILabelApp):
    """Conf (``--conf key value``):

    - ``model``: checkpoint in ``model/`` (or a path) served as ``segany_pet``: this project's default
      model, a SAM-Med3D or a SegAnyPET file (default ``segany_pet_small.pt``);
    - ``inference_dtype``: ``float32`` (default) or ``bfloat16`` for the image encoder;
    - ``threshold_method``: default of ``suv_threshold`` (relative_41, relative_50, sized_41, fixed_2.5, fixed_4.0);
    - ``volume_cache``: scans kept in memory (4); ``sessions``: annotator sessions kept (64);
    - ``embedding_cache_mb``: memory for cached image embeddings, all scans and annotators together (2048);
      ``prewarm``: ``true`` (default) encodes a scan's likely click sites in the background as soon as a client
      fetches it or a strategy serves it (`segany_pet.label.prewarm`), ``false`` only when clicked;
    - ``lease_minutes``: how long a scan served by ``disagreement`` / ``label_review`` stays with its
      annotator (30);
    - ``dicomweb_cache``: with a DICOMweb studies URL, where converted series, labels and scores are kept
      (default ``.segany_pet/dicomweb`` in the app folder);
    - ``auth_tokens``: an accounts file (``segany-pet token add``) to turn sign-in and roles on;
      ``cors_origins``: comma-separated origins of other sites' pages allowed to call the server;
      ``max_request_mb``: the largest request body (``segany_pet.label.access``).

    Folders of DICOM PET series in a local studies folder are converted to SUV once, in the background, and
    served beside the NIfTI images (``segany_pet.label.dicom_studies``; /info ``dicom_import`` lists refusals).

    Scoring (``POST /scoring/cross_prompt``) runs only when asked: MONAI Label's habit of rescoring after every
    served sample and saved label would start a cohort-wide job each time.

    Training (``POST /train/segany_pet``) keeps its runs and publishes its model under the datastore's
    ``.segany_pet/`` folder (a model trained on these labels belongs to them, not to every datastore the app
    serves); the published model is served in place of ``model`` until it is deleted.
    """

    def __init__(self, app_dir, studies, conf):
        self.volumes = VolumeCache(capacity=int(conf_number(conf, "volume_cache", 4, low=1, high=64)))
        # Not "sessions": MONAILabelApp.sessions() is its upload sessions (PUT /session/), which this would hide.
        capacity = int(conf_number(conf, "sessions", 64, low=1, high=10000))
        self.annotation_sessions = AnnotationSessions(capacity=capacity)
        self.local = not studies.startswith(("http://", "https://"))
        self.state_dir = Path(studies) / STATE_DIR if self.local else Path(app_dir) / STATE_DIR
        self.dicomweb_cache = None if self.local else Path(conf.get("dicomweb_cache") or self.state_dir / "dicomweb")
        cache_mb = conf_number(conf, "embedding_cache_mb", DEFAULT_EMBEDDING_CACHE_MB, low=16, high=1 << 20)
        self.served_model = served_model_for(self.state_dir, conf.get("model"), conf.get("inference_dtype"), cache_mb)
        # Only the datastore's scans are warmed: an upload is read once and removed.
        scans_root = Path(studies) if self.local else self.dicomweb_cache
        self.prewarmer = Prewarmer(self.served_model, self.volumes, scans_root) if conf_flag(conf, "prewarm", True) \
            else None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SegAnyPET Label",
            description="Promptable 3D segmentation of whole-body PET (FDG, PSMA)",
            version=segany_pet.__version__,
            labels=list(LESION_LABELS),  # a list: OHIF's MONAI Label panel appends the models' labels to it
        )
        self._auto_update_scoring = False

    def init_datastore(self):
        if not self.local:
            # MONAI Label's own would download dcmqi from the internet, list CT only and leave Bq/mL.
            return PETDICOMWebDatastore(dicomweb_client(self.studies), cache_path=self.dicomweb_cache)
        # Only NIfTI: MONAI Label's default list (PNG, SVS, ...) would show files no task can read. Writes from
        # the server and its training subprocesses must not overwrite each other: PETDatastore.
        return PETDatastore(
            self.studies,
            extensions=("*.nii.gz", "*.nii"),
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self):
        method = self.conf.get("threshold_method", "relative_41")
        shared = {"served": self.served_model, "volumes": self.volumes, "sessions": self.annotation_sessions,
                  "edge": self.conf.get("edge", DEFAULT_EDGE), "prewarmer": self.prewarmer}
        return {
            PROMPTABLE: PromptableSegmentationInfer(**shared),
            # The same model for OHIF's vista3d panel, which sends points + point_labels.
            "segany_pet_vista": PromptableSegmentationInfer(**shared, infer_type="vista3d"),
            "suv_threshold": SUVThresholdInfer(default_method=method, volumes=self.volumes),
        }

    def init_trainers(self):
        return {
            PROMPTABLE: PromptableTrainTask(PROMPTABLE, self.served_model, self.state_dir),
            f"{PROMPTABLE}_cpcl": PromptableTrainTask(f"{PROMPTABLE}_cpcl", self.served_model, self.state_dir,
                                                      method="cpcl"),
        }

    def init_strategies(self):
        lease_minutes = conf_number(self.conf, "lease_minutes", 30, low=1, high=7 * 24 * 60)
        return {
            "disagreement": disagreement_strategy(lease_minutes),
            "disagreement_diverse": diverse_disagreement_strategy(lease_minutes),
            "label_review": label_review_strategy(lease_minutes),
            "random": Random(),
            "first": First(),
        }

    def init_scoring_methods(self):
        return {"cross_prompt": CrossPromptScoring(self.served_model, self.state_dir)}

    def on_init_complete(self):
        super().on_init_complete()
        # Only the server has a FastAPI app; training/scoring subprocesses build this class too.
        from monailabel.app import app as fastapi_app

        from segany_pet.label.access import bound_host, install_access_control, warn_if_exposed
        from segany_pet.label.routes import (
            check_and_stop_training,
            check_scoring_requests,
            document_errors,
            drop_unserved_routers,
            refuse_run_all,
            serve_checked_logs,
            serve_checked_sessions,
            serve_confined_datastore,
            serve_leased_strategies,
            serve_model_files,
        )
        from segany_pet.label.server import add_ohif_addons, install_error_handlers, serve_infer_off_the_event_loop

        if self.local:
            # DICOM PET series in the studies folder become SUV images; in the background, so the server answers
            # at once and each series appears as soon as it is converted (once: later starts skip it).
            threading.Thread(target=import_dicom_series, name="DICOM import", daemon=True,
                             args=(self.datastore(), self.studies, self.state_dir)).start()
        warn_if_exposed(install_access_control(fastapi_app, self.conf), bound_host())
        install_error_handlers(fastapi_app)
        drop_unserved_routers(fastapi_app)
        serve_confined_datastore(fastapi_app, self, accepts_images=self.local, prewarmer=self.prewarmer)
        serve_checked_sessions(fastapi_app)
        serve_confined_dicomweb_proxy(fastapi_app, None if self.local else self.studies)
        serve_model_files(fastapi_app, {PROMPTABLE: self.served_model})
        serve_checked_logs(fastapi_app)
        serve_infer_off_the_event_loop(fastapi_app, {name: task for name, task in self._infers.items()
                                                     if isinstance(task, PromptableSegmentationInfer)})
        add_ohif_addons(fastapi_app)
        check_and_stop_training(fastapi_app, self._trainers, self.datastore())
        check_scoring_requests(fastapi_app, self._scoring_methods, self.datastore())
        serve_leased_strategies(fastapi_app, self, self._strategies, {"disagreement", "label_review"},
                                prewarmer=self.prewarmer)
        refuse_run_all(fastapi_app, self._trainers, self._scoring_methods)
        document_errors(fastapi_app)
        self.served_model.start_loading()

    def info(self):
        info = super().info()
        if self.prewarmer is not None:
            info["prewarm"] = self.prewarmer.describe()
        if self.local:
            info["dicom_import"] = dicom_import_summary(self.state_dir)
        return info

    def infer(self, request, datastore=None):
        # A client names a scan by its id (checked, resolved inside the datastore); only the server's own upload
        # and session code hands an absolute path (segany_pet.label.server: params may not set the image).
        image = request.get("image")
        if not isinstance(image, str) or not os.path.isabs(image):
            uri = (datastore or self.datastore()).get_image_uri(checked_name(image, "image id"))
            if not uri:
                raise UnknownImageError(
                    f"image {image!r} is not in the datastore; GET /datastore/?output=all lists the image ids"
                )
            request = {**request, "image": uri}
        return super().infer(request, datastore)
