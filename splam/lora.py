"""A LoRA of the distilled student against its teacher, by truncated SVD of the weight deltas.

For each linear or convolution layer whose weight changed, ``dW = W_student - W_teacher``
(a conv kernel flattened to ``[out, in * k * k]``) is approximated by its best rank-``r``
factorisation ``dW ~ B A`` with ``B = U_r diag(S_r)`` and ``A = V_r^T`` (Eckart-Young), in
the layout of diffusers' PEFT LoRAs: ``lora_A`` a ``[r, in]`` linear (or an ``r``-channel
conv with the layer's kernel), ``lora_B`` an ``[out, r]`` linear (or 1x1 conv), with
``lora_alpha = r`` so the scale is 1. The bias delta goes to ``lora_B.bias``, which
diffusers loads as PEFT's ``lora_bias``. Normalisation layers have no LoRA form: their
changes are left out, which bounds how closely even a full-rank LoRA can match.
"""

import torch


def low_rank_factors(delta: torch.Tensor, rank: int):
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of the 2-D ``delta``."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, S.numel())
    return Vh[:rank].float(), (U[:, :rank] * S[:rank]).float()


@torch.no_grad()
def extract_lora(teacher_unet, student_unet, rank: int, bias: bool = True) -> dict:
    """The LoRA state dict (keys ``<module>.lora_A.weight``, ``<module>.lora_B.weight``,
    ``<module>.lora_B.bias``) that takes ``teacher_unet`` towards ``student_unet``, which must
    have the teacher's architecture (fold its gamma conditioning first).

    With ``bias=False`` the bias deltas are left out (no ``lora_B.bias`` keys): a less exact LoRA,
    but one that ``fuse_lora`` can merge. With them, PEFT gives every layer a LoRA bias, and
    layers without a bias of their own (the attention projections) cannot be merged."""
    if student_unet.config.time_cond_proj_dim is not None and teacher_unet.config.time_cond_proj_dim is None:
        raise ValueError("the student has a gamma projection the teacher lacks: fold it first (scripts/fold_gamma.py)")
    teacher_shapes = {name: value.shape for name, value in teacher_unet.state_dict().items()}
    if teacher_shapes != {name: value.shape for name, value in student_unet.state_dict().items()}:
        raise ValueError("the student's architecture differs from the teacher's: was it distilled from this teacher?")
    teacher_modules = dict(teacher_unet.named_modules())
    lora = {}
    for name, module in student_unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        base = teacher_modules[name]
        delta = module.weight - base.weight
        bias_delta = None if module.bias is None or not bias else module.bias - base.bias
        if not delta.any() and (bias_delta is None or not bias_delta.any()):
            continue
        A, B = low_rank_factors(delta.reshape(delta.shape[0], -1), rank)
        if isinstance(module, torch.nn.Conv2d):
            A = A.reshape(A.shape[0], *delta.shape[1:])
            B = B[:, :, None, None]
        lora[f"{name}.lora_A.weight"] = A.contiguous()
        lora[f"{name}.lora_B.weight"] = B.contiguous()
        if bias:
            lora[f"{name}.lora_B.bias"] = torch.zeros(delta.shape[0]) if bias_delta is None else bias_delta.float()
    # A LoRA without alphas whose layers differ in rank (those narrower than ``rank``) loads in older diffusers
    # (0.35.2 among them; requirements.txt allows 0.32) with each layer scaled by the first layer's rank over
    # its own: all get one rank, the directions a layer lacks zero.
    common = max((value.shape[0] for key, value in lora.items() if key.endswith("lora_A.weight")), default=0)
    for key in [key for key in lora if key.endswith("lora_A.weight")]:
        A, B = lora[key], lora[key.replace("lora_A", "lora_B")]
        missing = common - A.shape[0]
        lora[key] = torch.cat([A, A.new_zeros(missing, *A.shape[1:])])
        lora[key.replace("lora_A", "lora_B")] = torch.cat([B, B.new_zeros(B.shape[0], missing, *B.shape[2:])], dim=1)
    return lora
