"""Files that run a command when unpickled: what rcm's readers must refuse before any of it runs."""

import os
import pickle


class RunsCode:
    """Unpickling this object runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_pickle(marker) -> bytes:
    """A pickle (as pickle.dump writes it) whose loading creates ``marker``."""
    return pickle.dumps({"x": RunsCode(marker)})


def runs_when_unpickled(path, marker) -> bool:
    """The control: plain unpickling of ``path`` creates ``marker`` (removed again afterwards)."""
    with open(path, "rb") as f:
        try:
            pickle.load(f)
        except Exception:  # noqa: BLE001 - the payload ran or it did not; the marker says which
            pass
    ran = os.path.exists(marker)
    if ran:
        os.unlink(marker)
    return ran
