"""python -m ddp_finetune.config README.md: regenerate the README's config reference after a field changes."""

import sys

from ddp_finetune.config.sections import write_reference

print("updated" if write_reference(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "up to date")
