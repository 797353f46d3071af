import os

import pytest

# Tests never reach the Hub: without these a hub call hangs ~50 s before failing.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A test process is no child of `python -m tam_hf.run`: a variable inherited from a shell that was would
# register through tam_hf's start-up hook and hide the tests' own register()/unregister().
os.environ.pop("TAM_HF_REGISTER", None)


@pytest.fixture
def registered():
    """tam_hf.register() for one test, tam_hf.unregister() after it: transformers is left as it was found. Use it
    (``pytestmark = pytest.mark.usefixtures("registered")``) instead of registering at import time."""
    import tam_hf

    names = tam_hf.register()
    yield names
    tam_hf.unregister()
