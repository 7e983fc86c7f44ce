"""Fine-tune torchvision models with Hugging Face Accelerate; the same config gives the same
training on 1 CPU process, N GPUs or N SLURM nodes."""

__version__ = "0.1.0"
