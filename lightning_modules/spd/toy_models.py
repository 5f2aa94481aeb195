"""Toy targets for SPD: TMS (toy model of superposition) and ResidMLP, plus a trainer on sparse feature data.

The data comes from `datamodules.sparse_features`, imported inside the functions that need it so this
module stays importable without Lightning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class TiedTransposeLinear(nn.Linear):
    """nn.Linear whose weight is another Linear's weight transposed (no parameter of its own).

    The source module is held outside the module tree (so it is not a submodule, not matched twice by
    patterns and not duplicated in the state dict); since `.weight` is read through it on every call,
    the tie survives device moves, optimizer steps and deepcopy.
    """

    def __init__(self, source: nn.Linear, bias: bool = True) -> None:
        nn.Module.__init__(self)
        self._source = (source,)  # a tuple: not registered as a submodule
        self.in_features = source.out_features
        self.out_features = source.in_features
        if bias:
            bound = 1 / math.sqrt(self.in_features)  # nn.Linear's default bias init
            self.bias = nn.Parameter(torch.empty(self.out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """source.weight^T: (in of source, out of source) = (out_features, in_features)."""
        return self._source[0].weight.t()


class TMSModel(nn.Module):
    """x_hat = ReLU(W^T [hidden layers] [identity] W x + b) with linear1 = W (n_f -> n_h, no bias)."""

    def __init__(
        self,
        n_features: int,
        n_hidden: int,
        n_hidden_layers: int = 0,
        tied: bool = True,
        identity_insert: bool = False,
        init_bias_to_zero: bool = False,
    ) -> None:
        super().__init__()
        self.n_features, self.n_hidden = n_features, n_hidden
        self.value_range = (0.0, 1.0)
        self.linear1 = nn.Linear(n_features, n_hidden, bias=False)
        # Optional linear (no nonlinearity) n_h -> n_h layers, as in the reference.
        self.hidden_layers = nn.ModuleList(
            nn.Linear(n_hidden, n_hidden, bias=False) for _ in range(n_hidden_layers)
        )
        self.identity: nn.Linear | None = None
        if identity_insert:
            # A fixed identity map SPD can decompose (the "+ID" TMS variants): not trained.
            self.identity = nn.Linear(n_hidden, n_hidden, bias=False)
            with torch.no_grad():
                self.identity.weight.copy_(torch.eye(n_hidden))
            self.identity.weight.requires_grad_(False)
        self.linear2: nn.Linear = (
            TiedTransposeLinear(self.linear1) if tied else nn.Linear(n_hidden, n_features, bias=True)
        )
        if init_bias_to_zero:  # the reference's TMS 40-10 recipe (5-2 keeps nn.Linear's init)
            with torch.no_grad():
                self.linear2.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """x (..., n_features) -> x_hat (..., n_features)."""
        h = self.linear1(x)  # (..., n_hidden)
        if self.identity is not None:
            h = self.identity(h)
        for layer in self.hidden_layers:
            h = layer(h)
        return F.relu(self.linear2(h))

    def labels(self, x: Tensor) -> Tensor:
        """TMS reconstructs its input."""
        return x


class ResidMLPBlock(nn.Module):
    """resid -> mlp_out(act(mlp_in(resid)))."""

    def __init__(
        self, d_embed: int, d_mlp: int, act: str = "relu", in_bias: bool = False, out_bias: bool = False
    ):
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=in_bias)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=out_bias)
        self.act = F.relu if act == "relu" else F.gelu

    def forward(self, resid: Tensor) -> Tensor:
        """(..., d_embed) -> (..., d_embed)."""
        return self.mlp_out(self.act(self.mlp_in(resid)))


class ResidMLP(nn.Module):
    """Fixed random embedding W_E (unit rows), per layer resid += W_out act(W_in resid), unembed W_E^T.

    Labels: y = x + act(coeffs * x) with coeffs fixed (ones by default; the reference draws U[1, 2]);
    feature values are drawn from [-1, 1].
    """

    def __init__(
        self,
        n_features: int,
        d_embed: int,
        d_mlp: int,
        n_layers: int = 1,
        act: str = "relu",
        in_bias: bool = False,
        out_bias: bool = False,
        label_coeffs: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if act not in ("relu", "gelu"):
            raise ValueError(f"unknown act {act!r}; valid: ['relu', 'gelu']")
        self.n_features, self.d_embed = n_features, d_embed
        self.value_range = (-1.0, 1.0)
        self.act_name = act
        gen = torch.Generator().manual_seed(seed)
        w_e = torch.randn(n_features, d_embed, generator=gen)
        self.register_buffer("W_E", w_e / w_e.norm(dim=-1, keepdim=True))  # (n_features, d_embed), fixed
        coeffs = torch.ones(n_features) if label_coeffs is None else label_coeffs.float()
        self.register_buffer("label_coeffs", coeffs)  # (n_features,)
        self.layers = nn.ModuleList(
            ResidMLPBlock(d_embed, d_mlp, act, in_bias, out_bias) for _ in range(n_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (..., n_features) -> (..., n_features)."""
        resid = x @ self.W_E  # (..., d_embed)
        for layer in self.layers:
            resid = resid + layer(resid)
        return resid @ self.W_E.t()

    def labels(self, x: Tensor) -> Tensor:
        """y = x + act(coeffs * x)."""
        act = F.relu if self.act_name == "relu" else F.gelu
        return x + act(self.label_coeffs * x)


def train_toy_model(
    model: TMSModel | ResidMLP,
    steps: int = 10_000,
    batch: int = 1024,
    lr: float = 5e-3,
    wd: float = 0.01,
    feature_prob: float = 0.05,
    seed: int = 0,
) -> list[float]:
    """Plain AdamW loop on MSE(model(x), model.labels(x)) with sparse features; returns per-step losses."""
    from datamodules.sparse_features import sparse_feature_batch  # here: datamodules imports Lightning

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    losses = []
    for _ in range(steps):
        x = sparse_feature_batch(batch, model.n_features, feature_prob, gen, device, model.value_range)
        loss = F.mse_loss(model(x), model.labels(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def check_tms_target(
    model: TMSModel, feature_prob: float = 0.05, n_eval: int = 20_000, seed: int = 1234
) -> dict[str, object]:
    """Checks a trained TMS target: all |W_j| > 0.9, diag of model(0.75 I) within 0.1 of 0.75, MSE < 0.003."""
    from datamodules.sparse_features import sparse_feature_batch  # here: datamodules imports Lightning

    device = model.linear1.weight.device
    norms = model.linear1.weight.norm(dim=0)  # (n_features,) column norms of W (n_hidden, n_features)
    diag = model(0.75 * torch.eye(model.n_features, device=device)).diagonal()  # (n_features,)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = sparse_feature_batch(n_eval, model.n_features, feature_prob, gen, device)
    mse = F.mse_loss(model(x), x).item()
    checks = {
        "feature_norms": norms.tolist(),
        "represented_features": int((norms > 0.9).sum()),
        "norms_ok": bool((norms > 0.9).all()),
        "diag": diag.tolist(),
        "diag_ok": bool(((diag - 0.75).abs() < 0.1).all()),
        "mse": mse,
        "mse_ok": mse < 0.003,
    }
    checks["passed"] = checks["norms_ok"] and checks["diag_ok"] and checks["mse_ok"]
    return checks
