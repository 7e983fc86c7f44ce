"""The `ddp-finetune` command line and the commands that are only commands."""
