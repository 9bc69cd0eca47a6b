"""SAFEModel: the frozen base, plus audio tokens fused into chosen LLM layers per example.

Each example carries a token budget k (a LongTensor of shape (B,)). Rows with k = 0 are never
touched: the audio encoder does not see them, and the fusion hooks *select* the rows with
k > 0, fuse those, and copy them back (``index_copy``). A budget-0 row therefore goes through
exactly the arithmetic of the base's own forward on the same batch, so its logits are equal
bit for bit, even when other rows of the batch use audio. Multiplying by a zero gate would not
give that guarantee (NaN * 0 is NaN; kernels may pick other paths), selecting rows does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..features.memo import FeatureMemo
from .audio_encoders import AudioEncoder, Waveform
from .base import BaseVLModel
from .fusion_adapter import AudioReadout, FusionAdapter
from .projectors import AudioProjector


def repeat_rows(rows: Optional[torch.Tensor], factor: int) -> Optional[torch.Tensor]:
    """Indices of ``rows`` in a batch whose every example is repeated ``factor`` times in a row."""
    if rows is None or factor == 1:
        return rows
    return (rows[:, None] * factor + torch.arange(factor, device=rows.device)).reshape(-1)


def repeat_readout(readout: AudioReadout, factor: int) -> AudioReadout:
    if factor == 1:
        return readout

    def repeat(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.repeat_interleave(factor, dim=0)

    # out_bias is the block's own, one for every row.
    return readout._replace(keys=repeat(readout.keys), values=repeat(readout.values),
                            key_mask=repeat(readout.key_mask), key_bias=repeat(readout.key_bias))


class SAFEModel(nn.Module):
    def __init__(
        self,
        base: BaseVLModel,
        projector: AudioProjector,
        fusion: FusionAdapter,
        audio_encoder: Optional[AudioEncoder] = None,
    ):
        super().__init__()
        outside = [layer for layer in fusion.layers if not 0 <= layer < base.num_layers]
        if outside:
            raise ValueError(f"fusion layers {outside} outside the base LLM's {base.num_layers} layers")
        self.base = base
        self.base_model = base.model  # registered so .to() moves it; frozen by load_base
        self.audio_encoder = audio_encoder
        self.projector = projector
        self.fusion = fusion
        # Mixed precision for the trainable parts only (training.autocast): the projector and the
        # fusion blocks compute in this dtype under torch.autocast, their weights stay float32.
        # The base is never autocast: budget-0 rows remain the base's own arithmetic.
        self.autocast_dtype: Optional[torch.dtype] = None
        # Stage A sets it (audio_encoder.memory_cache_mb): each clip's frozen features, encoded once.
        self.feature_memo: Optional[FeatureMemo] = None

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ parameters

    def train(self, mode: bool = True) -> "SAFEModel":
        super().train(mode)
        self.base_model.eval()  # frozen parts never leave eval mode (dropout would change them)
        if self.audio_encoder is not None:
            self.audio_encoder.eval()
        return self

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters():
            if param.requires_grad:
                yield name, param

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: projector and fusion parameters that require grad."""
        return {name: param.detach().clone() for name, param in self.trainable_named_parameters()}

    def base_fingerprint(self) -> str:
        return self.base.fingerprint()

    # ------------------------------------------------------------------ audio

    def encode_audio(self, waves: Sequence[Waveform]) -> torch.Tensor:
        if self.audio_encoder is None:
            raise ValueError("this SAFEModel has no audio encoder; pass audio_features instead of audio")
        with torch.no_grad():
            if self.feature_memo is None:
                return self.audio_encoder(waves)
            return self.feature_memo.encode(self.audio_encoder, waves)

    def audio_tokens(
        self,
        budgets: torch.Tensor,
        audio: Optional[Sequence[Waveform]] = None,
        audio_features: Optional[torch.Tensor] = None,
        frame_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (n, k_max, H) and their validity mask (n, k_max) for rows with budgets > 0."""
        tokens = self._project_audio(int(budgets.max()), audio, audio_features, frame_mask)
        return tokens, self._token_mask(budgets, tokens.shape[1]).to(tokens.device)

    def _project_audio(
        self,
        k_max: int,
        audio: Optional[Sequence[Waveform]],
        audio_features: Optional[torch.Tensor],
        frame_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """The first ``k_max`` projector tokens of each row's clip (encoding it when needed)."""
        if audio_features is None:
            if audio is None:
                raise ValueError("rows with a token budget > 0 need audio or audio_features")
            audio_features = self.encode_audio(audio)
            if frame_mask is None:  # a whisper trimmed to the clip zero-fills the rows past a shorter clip
                batch_mask = getattr(self.audio_encoder, "batch_mask", None)
                rows = None if batch_mask is None else batch_mask(audio)
                frame_mask = None if rows is None else rows.to(audio_features.device)
        with self._autocast(audio_features.device):
            return self.projector(audio_features, k_max, frame_mask)

    @staticmethod
    def _token_mask(budgets: torch.Tensor, k_max: int) -> torch.Tensor:
        return torch.arange(k_max, device=budgets.device)[None, :] < budgets[:, None]

    @property
    def branch_layer(self) -> int:
        """The first fused layer: up to its output every row is the base's own computation, so the
        gate's state is read there and the forward branches into rows with and without audio."""
        return min(self.fusion.layers)

    # ------------------------------------------------------------------ forward

    # What the fused layers do to one batch: None (no row takes audio: the base itself), or the rows
    # that take it (None = every row) and each fused block's readout of those rows' audio.
    FusionPlan = Optional[tuple[Optional[torch.Tensor], dict[int, AudioReadout]]]

    @contextlib.contextmanager
    def _fusion_hooks(self, batch: int, plan_for: Callable[[int, torch.Tensor], "SAFEModel.FusionPlan"]):
        """Fuse audio into the output of each chosen decoder layer, as ``plan_for(layer, hidden)`` says.

        ``generate`` with beams or several return sequences runs the layers on ``batch * n``
        rows, each example repeated n times in a row (``repeat_interleave``, as Hugging Face
        expands its inputs); the hooks expand their rows and readouts to match, so every copy of
        an example fuses that example's audio and the copies of a budget-0 example stay the base's.
        """
        handles = []
        dtype = self.projector.queries.dtype
        expanded: dict[tuple[int, int], tuple[Optional[torch.Tensor], AudioReadout]] = {}

        def for_rows(layer: int, size: int, rows, readouts) -> tuple[Optional[torch.Tensor], AudioReadout]:
            factor, rest = divmod(size, batch)
            if rest or not factor:
                raise RuntimeError(f"a fused layer saw {size} rows for a batch of {batch}; SAFE follows generate's "
                                   "beam and sampling expansion (each example repeated), not this one")
            key = (layer, factor)
            if key not in expanded:
                expanded[key] = (repeat_rows(rows, factor), repeat_readout(readouts[layer], factor))
            return expanded[key]

        for layer in self.fusion.layers:
            block = self.fusion.block(layer)

            def hook(module, args, output, block=block, layer=layer):
                hidden = output[0] if isinstance(output, tuple) else output
                plan = plan_for(layer, hidden)
                if plan is None:
                    return output  # no row takes audio: the layer's own output, untouched
                layer_rows, readout = for_rows(layer, hidden.shape[0], *plan)
                # The block's residual stream runs in the trainable parts' dtype (float32), also
                # under autocast, where only its matrix products drop to bfloat16.
                with self._autocast(hidden.device):
                    if layer_rows is None:
                        merged = block.fuse(hidden.to(dtype), readout).to(hidden.dtype)
                    else:
                        fused = block.fuse(hidden.index_select(0, layer_rows).to(dtype), readout)
                if layer_rows is not None:  # outside autocast: the copy keeps the base's dtype exactly
                    merged = hidden.index_copy(0, layer_rows, fused.to(hidden.dtype))
                return (merged,) + tuple(output[1:]) if isinstance(output, tuple) else merged

            handles.append(self.base.decoder_layers[layer].register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(
        self,
        input_ids: torch.Tensor,
        token_budget: Optional[torch.Tensor] = None,
        audio: Optional[Sequence[Waveform]] = None,
        audio_features: Optional[torch.Tensor] = None,
        audio_frame_mask: Optional[torch.Tensor] = None,
        **base_inputs: Any,
    ) -> Any:
        """Run the base with audio fused into rows whose budget is > 0.

        Args:
            input_ids, attention_mask, pixel_values, ...: the base model's own inputs.
            token_budget: (B,) LongTensor; 0 = the base's own computation for that row.
            audio: per-row waveforms at the encoder's sample rate (entries of budget-0 rows are
                ignored and may be None), or
            audio_features: precomputed encoder features (B, T, D) aligned with the batch.

        Returns the base's Hugging Face output; ``.logits`` is (B, L, vocab).
        """
        with self._audio_fused(input_ids, token_budget, audio, audio_features, audio_frame_mask):
            return self.base(input_ids=input_ids, **base_inputs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        token_budget: Optional[torch.Tensor] = None,
        audio: Optional[Sequence[Waveform]] = None,
        audio_features: Optional[torch.Tensor] = None,
        audio_frame_mask: Optional[torch.Tensor] = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """The base's ``generate`` with audio fused into rows whose budget is > 0.

        The audio tokens are computed once; the cross-attention reads them at every decoding
        step (each text position attends to audio only, so the KV cache stays valid).
        """
        with self._audio_fused(input_ids, token_budget, audio, audio_features, audio_frame_mask):
            return self.base_model.generate(input_ids=input_ids, **generate_kwargs)

    @torch.no_grad()
    def generate_gated(
        self,
        input_ids: torch.Tensor,
        decide: Callable[[torch.Tensor], torch.Tensor],
        audio: Sequence[Optional[Waveform]],
        **generate_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``generate`` that decides each row's budget inside its own prefill; returns (ids, budgets).

        ``decide(hidden)`` gets the first fused layer's output over the prompt (B, L, H), before
        any audio is added, and returns the (B,) budgets. The layers up to there are the base's
        own for every row; from there the same forward fuses audio into the rows with a budget
        (the encoder sees only their clips) and leaves the others the base's, and decoding
        continues from that one prefill's KV cache. Greedy or sampled, one sequence a row: a
        beam would run the prefill on expanded rows the decision is not made for.
        """
        batch = input_ids.shape[0]
        branch = self.branch_layer
        decided: dict[str, Any] = {}

        def plan_for(layer: int, hidden: torch.Tensor) -> "SAFEModel.FusionPlan":
            if "plan" not in decided:
                if layer != branch or hidden.shape[0] != batch:
                    raise RuntimeError(f"generate_gated decides in the prefill of {batch} rows at layer {branch}; "
                                       f"layer {layer} ran first on {hidden.shape[0]} rows (beam search is not "
                                       "supported here)")
                budgets = self._budget_list(decide(hidden), batch)
                decided["budgets"] = torch.tensor(budgets, dtype=torch.long)
                decided["plan"] = self._plan(budgets, audio, None, None, input_ids.device)
            return decided["plan"]

        with self._fusion_hooks(batch, plan_for):
            output = self.base_model.generate(input_ids=input_ids, **generate_kwargs)
        if "budgets" not in decided:
            raise RuntimeError("generate ran no prefill through the fused layers; nothing was decided")
        return output, decided["budgets"]

    def _budget_list(self, token_budget: Any, batch: int) -> list[int]:
        token_budget = torch.as_tensor(token_budget, dtype=torch.long)
        if token_budget.shape != (batch,):
            raise ValueError(f"token_budget must have shape ({batch},), got {tuple(token_budget.shape)}")
        # One transfer to Python answers every question below (range, rows, uniformity); a
        # handful of tensor reductions would each cost a kernel launch and a device sync.
        budgets = token_budget.tolist()
        if min(budgets) < 0 or max(budgets) > self.projector.num_audio_tokens:
            raise ValueError(f"token budgets must be in 0..{self.projector.num_audio_tokens}")
        return budgets

    def _plan(self, budgets: list[int], audio, audio_features, audio_frame_mask, device) -> "SAFEModel.FusionPlan":
        """Audio tokens and readouts for the rows with a budget > 0 (None when there are none)."""
        row_list = [i for i, budget in enumerate(budgets) if budget > 0]
        if not row_list:
            return None  # no encoder, no adapter: the base itself
        every_row = len(row_list) == len(budgets)  # common in training; skips copying (B, 1500, D) features
        rows = None if every_row else torch.tensor(row_list, device=device)

        def select(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if tensor is None or rows is None:
                return tensor
            return tensor.index_select(0, rows.to(tensor.device))

        row_audio = None if audio is None else [audio[i] for i in row_list]
        row_budgets = [budgets[i] for i in row_list]
        tokens = self._project_audio(max(row_budgets), row_audio, select(audio_features), select(audio_frame_mask))
        # Every fused row using all k_max tokens (the common case) needs no key mask.
        mask = None if len(set(row_budgets)) == 1 else self._token_mask(
            torch.tensor(row_budgets, device=tokens.device), tokens.shape[1])
        # What each block reads from the audio does not depend on the text: read it once here,
        # not in the hook (which generate() runs at every decoding step).
        with self._autocast(tokens.device):
            readouts = {layer: self.fusion.block(layer).read_audio(tokens, mask) for layer in self.fusion.layers}
        return rows, readouts

    @contextlib.contextmanager
    def _audio_fused(self, input_ids, token_budget, audio, audio_features, audio_frame_mask):
        """Checks the budgets, computes audio tokens for rows with k > 0 and installs the hooks."""
        batch = input_ids.shape[0]
        if token_budget is None:
            token_budget = torch.zeros(batch, dtype=torch.long)
        budgets = self._budget_list(token_budget, batch)
        plan = self._plan(budgets, audio, audio_features, audio_frame_mask, input_ids.device)
        if plan is None:
            yield  # no encoder, no hooks: the base itself
            return
        with self._fusion_hooks(batch, lambda layer, hidden: plan):
            yield
