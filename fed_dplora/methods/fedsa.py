"""FedSA-LoRA (Guo et al., ICLR 2025): A learns what sites share and is averaged; B
learns what is particular to a site and never leaves it (each site keeps its own
between rounds, `fed_dplora.site.state`). The head is shared. Evaluation is per site,
each with its own B on its own test split; the global model (A and head, B = 0) is
scored too. The aggregate of A alone has no LoRA product to compare, so no aggregation
error is reported."""

from fed_dplora.methods.base import LoraMethod

METHOD = LoraMethod("fedsa", a_trains=True, shared_a=False, local=frozenset({"B"}))
