"""FFA-LoRA (Sun et al., ICLR 2024): every A frozen at the seeded init on every party,
only B (and the head) trains and travels, so averaging B is averaging B A exactly."""

from fed_dplora.methods.base import LoraMethod

METHOD = LoraMethod("ffa", a_trains=False, shared_a=True)
