"""The PyTorch reference for `nanovlm-export validate --reference CKPT`: the checkpoint the bundle
came from, run greedily once per case (evaluation/metrics.py compares the bundle with it)."""

from __future__ import annotations

from typing import Any

from nanovlm.reference import greedy_reference
from nanovlm.vision_language_model import VisionLanguageModel
from runtime.pipeline import VLMPipeline

from .metrics import Case


class Reference:
    """The PyTorch model: image embeddings, greedy answer and the logits that chose each token.

    Results are kept per (case, max_new_tokens): comparing several bundles of one checkpoint (the
    demo, the quantization report) runs the PyTorch side once per case, not once per bundle.
    """

    def __init__(self, checkpoint: str):
        from nanovlm.checkpoint import resolve_checkpoint

        self.model = VisionLanguageModel.from_pretrained(resolve_checkpoint(checkpoint)).eval()
        if self.model.tokenizer is None:
            raise ValueError(f"{checkpoint}: no tokenizer in the checkpoint")
        self._runs: dict[tuple[Case, int], dict[str, Any]] = {}

    def run(self, pipe: VLMPipeline, case: Case, max_new_tokens: int) -> dict[str, Any]:
        key = (case, max_new_tokens)
        if key not in self._runs:
            self._runs[key] = self._run(pipe, case, max_new_tokens)
        return self._runs[key]

    def _run(self, pipe: VLMPipeline, case: Case, max_new_tokens: int) -> dict[str, Any]:
        m = self.model
        batch = pipe.prepare([case.images], [case.prompt])
        return {"batch": batch} | greedy_reference(m, batch, pipe.tokenizer.eos_token_id, max_new_tokens)
