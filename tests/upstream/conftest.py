"""Nothing here is one of herd's tests: ``run.py`` runs upstream's tests in subprocesses.

``herd_forced.py`` is a pytest plugin for those runs only; importing it would patch
jupyter_server's classes, so the project's own ``pytest`` must not collect this folder.
"""

collect_ignore_glob = ["*"]
