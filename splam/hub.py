"""Uploading the distilled pipeline to the Hugging Face Hub."""

from huggingface_hub import create_repo, upload_folder

# Training state and tracker logs stay local: they are large, and only the pipeline is the model.
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", ".checkpoint-*", "logs", "logs/*", "*.partial"]


def push_pipeline(output_dir: str, repo_id: str, token=None, private: bool = False) -> str:
    """Create ``repo_id`` if needed and upload ``output_dir`` (the pipeline and its card) to it;
    returns the commit URL. The token falls back to ``HF_TOKEN`` or the cached login."""
    repo_id = create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id
    commit = upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="SPLAM distillation",
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        token=token,
    )
    return commit.commit_url
