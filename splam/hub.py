"""Publishing to the Hugging Face Hub: the repository, the final pipeline, and checkpoint UNets
uploaded in the background while training goes on.

The token comes from ``--hub_token``, else ``HF_TOKEN`` or the cached login, and the Hub's
address from ``HF_ENDPOINT``, as in every huggingface_hub program. Uploads list what they
send (allow-lists), so optimizer states, tracker logs and anything else in ``output_dir``
never leave the machine.
"""

import logging
import os

from huggingface_hub import HfApi

from .args import one_line

logger = logging.getLogger(__name__)

PIPELINE_FILES = [
    "model_index.json", "README.md", "samples.png",
    "unet/*", "scheduler/*", "vae/*", "text_encoder/*", "tokenizer/*",
]
CHECKPOINT_FILES = ["unet/*", "unet_target/*"]


class HubError(RuntimeError):
    """The final upload failed; the pipeline is complete on the local disk."""


class HubPublisher:
    """Creates ``repo_id`` (if needed) at once, so that a wrong token or name fails before training."""

    def __init__(self, repo_id: str, token=None, private: bool = False):
        self.api = HfApi(token=token)
        self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        self.uploads = {}  # step -> (checkpoint folder, Future of its upload)

    def push_checkpoint(self, checkpoint_path: str, step: int) -> None:
        """Upload the checkpoint's UNets to ``checkpoints/step-<step>`` without waiting. Uploads
        of earlier checkpoints that failed are logged and started again now."""
        for failed_step, (failed_path, future) in list(self.uploads.items()):
            if future.done() and future.exception() is not None:
                logger.warning(f"Upload of checkpoint step {failed_step} failed ({future.exception()}); retrying")
                if os.path.isdir(failed_path):
                    self.uploads[failed_step] = (failed_path, self.start_checkpoint_upload(failed_path, failed_step))
                else:
                    logger.warning(f"{failed_path} was rotated away: step {failed_step} will not be on the Hub")
                    del self.uploads[failed_step]
        self.uploads[step] = (checkpoint_path, self.start_checkpoint_upload(checkpoint_path, step))

    def start_checkpoint_upload(self, checkpoint_path: str, step: int):
        return self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=checkpoint_path,
            path_in_repo=f"checkpoints/step-{step}",
            allow_patterns=CHECKPOINT_FILES,
            commit_message=f"Checkpoint at step {step}",
            run_as_future=True,
        )

    def uploading(self) -> frozenset:
        """The checkpoint folders whose upload has not finished (queued or under way)."""
        return frozenset(path for path, future in self.uploads.values() if not future.done())

    def wait_for_checkpoints(self) -> None:
        """Block until the background uploads are done; log the ones that failed."""
        for step, (_, future) in sorted(self.uploads.items()):
            if future.exception() is not None:
                logger.warning(f"Upload of checkpoint step {step} failed: {future.exception()}")

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
