"""Publishing to the Hugging Face Hub: the repository, the final pipeline, and checkpoint UNets
uploaded in the background while training goes on.

The token comes from ``--hub_token``, else ``HF_TOKEN`` or the cached login, and the Hub's
address from ``HF_ENDPOINT``, as in every huggingface_hub program. Uploads list what they
send (allow-lists), so optimizer states, tracker logs and anything else in ``output_dir``
never leave the machine.
"""

import logging
import os
from concurrent.futures import Future, wait
from typing import NamedTuple

from huggingface_hub import HfApi

from .args import one_line
from .checkpoints import checkpoint_step

logger = logging.getLogger(__name__)

PIPELINE_FILES = [
    "model_index.json", "README.md", "samples.png",
    "unet/*", "scheduler/*", "vae/*", "text_encoder/*", "tokenizer/*",
]
CHECKPOINT_FILES = ["unet/*", "unet_target/*"]


class CheckpointUpload(NamedTuple):
    path: str
    future: Future
    retried: bool  # this is a retry of a failed upload

    def failed(self) -> bool:
        return self.future.done() and self.future.exception() is not None


class HubError(RuntimeError):
    """The final upload failed; the pipeline is complete on the local disk."""


class HubPublisher:
    """Creates ``repo_id`` (if needed) at once, so that a wrong token or name fails before training."""

    def __init__(self, repo_id: str, token=None, private: bool = False):
        self.api = HfApi(token=token)
        self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        self.uploads = {}  # step -> CheckpointUpload

    def push_checkpoint(self, checkpoint_path: str, step: int) -> None:
        """Upload the checkpoint's UNets to ``checkpoints/step-<step>`` without waiting. Uploads
        of earlier checkpoints that failed are logged and started again now."""
        self.retry_failed()
        self.uploads[step] = self.start_checkpoint_upload(checkpoint_path, step, retried=False)

    def push_missing_checkpoints(self, checkpoint_paths) -> None:
        """Upload those of ``checkpoint_paths`` that are not on the Hub: a run killed before their
        uploads were done (they run in this process) resumed from them, and the rotation would
        delete them unsent. Each upload is one commit, so a ``step-<N>`` folder on the Hub is whole."""
        try:
            on_hub = {name.split("/")[1] for name in self.api.list_repo_files(self.repo_id) if name.startswith("checkpoints/")}
        except Exception as error:  # HTTP, network and auth errors of huggingface_hub alike
            logger.warning(f"cannot list the checkpoints on the Hub ({one_line(error)}): those a stopped run saved "
                           "but had not uploaded yet are not uploaded now")
            return
        for path in checkpoint_paths:
            step = checkpoint_step(path)
            if f"step-{step}" not in on_hub:
                logger.info(f"{path} is not on the Hub (its run stopped before uploading it, or ran without "
                            "--push_checkpoints): uploading it")
                self.uploads[step] = self.start_checkpoint_upload(path, step, retried=False)

    def retry_failed(self) -> None:
        """Start again the uploads that failed, but those whose folder the rotation has taken."""
        for step, upload in list(self.uploads.items()):
            if not upload.failed():
                continue
            logger.warning(f"Upload of checkpoint step {step} failed ({upload.future.exception()}); retrying")
            if os.path.isdir(upload.path):
                self.uploads[step] = self.start_checkpoint_upload(upload.path, step, retried=True)
            else:
                logger.warning(f"{upload.path} was rotated away: step {step} will not be on the Hub")
                del self.uploads[step]

    def start_checkpoint_upload(self, checkpoint_path: str, step: int, retried: bool) -> CheckpointUpload:
        future = self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=checkpoint_path,
            path_in_repo=f"checkpoints/step-{step}",
            allow_patterns=CHECKPOINT_FILES,
            commit_message=f"Checkpoint at step {step}",
            run_as_future=True,
        )
        return CheckpointUpload(checkpoint_path, future, retried)

    def caught_up(self, total_limit: int, wait_seconds: float = 60) -> bool:
        """Whether the uploads are at most ``total_limit`` checkpoints behind (huggingface_hub runs one
        at a time, so uploads slower than the checkpoints fall further behind at each); if they are
        not, first wait up to ``wait_seconds`` for the oldest, and say so."""
        unfinished = sorted(step for step, upload in self.uploads.items() if not upload.future.done())
        if len(unfinished) <= total_limit:
            return True
        logger.info(f"Waiting for the upload of checkpoint step {unfinished[0]}: uploads are {len(unfinished)} "
                    f"checkpoints behind, and --checkpoints_total_limit={total_limit}")
        wait([self.uploads[unfinished[0]].future], timeout=wait_seconds)
        return False

    def checkpoints_to_keep(self) -> frozenset:
        """The checkpoint folders that ``--checkpoints_total_limit``'s rotation must leave for their
        uploads: those queued or under way, and those that failed and have not had their retry yet."""
        return frozenset(upload.path for upload in self.uploads.values()
                         if not upload.future.done() or (upload.failed() and not upload.retried))

    def wait_for_checkpoints(self) -> None:
        """Block until the background uploads are done, those that failed retried once more; log
        the ones that failed."""
        for upload in self.uploads.values():
            upload.future.exception()
        self.retry_failed()
        for step, upload in sorted(self.uploads.items()):
            if upload.future.exception() is not None:
                logger.warning(f"Upload of checkpoint step {step} failed: {upload.future.exception()}")

    def push_pipeline(self, output_dir: str) -> str:
        """Upload the distilled pipeline, its model card and its sample grid; returns the commit URL."""
        try:
            commit = self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=output_dir,
                allow_patterns=PIPELINE_FILES,
                commit_message="SPLAM-distilled pipeline",
            )
        except Exception as error:  # HTTP, network and auth errors of huggingface_hub alike
            raise HubError(f"uploading the pipeline to {self.repo_id} failed ({one_line(error)}); it is complete in "
                           f"{output_dir}: upload its files listed in the README (Publishing) from there") from error
        return commit.commit_url
