import os
import time

_path = os.environ.get("LP_TRACE")
_fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if _path else None


def t(name: str) -> None:
    if _fd is not None:
        os.write(_fd, f"{name} {time.perf_counter():.6f}\n".encode())
