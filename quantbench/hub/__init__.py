"""The Hugging Face Hub side: a model card from the manifest, and the upload."""
from __future__ import annotations

from quantbench.hub.card import render_model_card
from quantbench.hub.upload import UploadResult, upload_artifact

__all__ = ["render_model_card", "upload_artifact", "UploadResult"]
