"""tailkd: knowledge distillation of causal language models.

The loss library (`tailkd.losses`) implements the Tail-Aware Distillation divergence of
"Don't Ignore the Tail" (TAD) beside vanilla KD, reverse KL, generalized JSD, DKD and DRKL;
`tailkd.objective` combines them with the student's CLM loss and normalises by the global
number of valid tokens.
"""

__version__ = "0.1.0"
