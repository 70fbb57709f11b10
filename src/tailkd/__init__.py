"""tailkd: knowledge distillation of causal language models.

The loss library (`tailkd.losses`) implements the Tail-Aware Distillation divergence of
"Don't Ignore the Tail" (TAD) beside vanilla KD, reverse KL, generalized JSD, DKD and DRKL;
`tailkd.objective` combines them with the student's CLM loss and normalises by the global
number of valid tokens. `tailkd.distill_loss` is that objective for your own training loop.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``tailkd.distill_loss`` (`tailkd.objective.distill_loss`), imported on first use: ``import tailkd`` (and the
    CLI's start) stays free of torch."""
    if name == "distill_loss":
        from tailkd.objective import distill_loss

        return distill_loss
    raise AttributeError(f"module 'tailkd' has no attribute {name!r}")
