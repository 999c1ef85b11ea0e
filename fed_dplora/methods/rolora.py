"""RoLoRA (Chen et al., 2025, arXiv:2502.01755): A and B both global, trained in alternate
rounds: B (with A held at the value sent) in odd rounds, A (with B held) in even ones;
the head every round. Each average is then exact: mean_i(B_i) A = mean_i(B_i A), B
mean_i(A_i) = mean_i(B A_i). B goes first: with B = 0 at the start, A's gradient is
zero."""

from fed_dplora.methods.base import LoraMethod

METHOD = LoraMethod("rolora", a_trains=True, shared_a=False,
                    alternation=(frozenset({"B", "head"}), frozenset({"A", "head"})))
