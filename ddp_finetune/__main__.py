import sys

from ddp_finetune.commands.cli import main

sys.exit(main())
