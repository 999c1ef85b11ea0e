"""DP-SGD wiring on top of Opacus per-sample gradients, and the silent-failure guards."""
