"""The one explicit table of passes. Add a pass by importing its class and adding it here."""
from __future__ import annotations

from compress.errors import ConfigError
from compress.passes.alpha_allocation import AlphaAllocation
from compress.passes.depth_prune import DepthPrune
from compress.passes.early_exit import EarlyExitPass
from compress.passes.gptq import GPTQ
from compress.passes.magnitude import Magnitude
from compress.passes.rtn import RTN
from compress.passes.sparse_finetune import SparseFinetune
from compress.passes.sparsegpt import SparseGPT
from compress.passes.wanda import Wanda
from compress.passes.width_prune import WidthPrune

PASSES: dict[str, type] = {
    RTN.name: RTN,
    GPTQ.name: GPTQ,
    AlphaAllocation.name: AlphaAllocation,
    Magnitude.name: Magnitude,
    Wanda.name: Wanda,
    SparseGPT.name: SparseGPT,
    WidthPrune.name: WidthPrune,
    DepthPrune.name: DepthPrune,
    SparseFinetune.name: SparseFinetune,
    EarlyExitPass.name: EarlyExitPass,
}


def get_pass_class(name: str, where: str = "pass") -> type:
    try:
        return PASSES[name]
    except KeyError:
        raise ConfigError(f"{where}: unknown pass {name!r} (known: {', '.join(PASSES)})") from None
