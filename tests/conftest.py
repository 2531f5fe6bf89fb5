import os

# Must be set before anything imports triton (timm and torch.compile do): kernels then run on
# CPU tensors in the interpreter, and no test can reach the network or block on a W&B login.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
