"""``python -m tam_hf.run SCRIPT.py|CONSOLE_SCRIPT|-m MODULE [args...]``: see :mod:`tam_hf.trainer.run`."""

from tam_hf.trainer.run import main

if __name__ == "__main__":
    main()
