"""``python -m sweeper.import_kohya CONFIG.toml|CONFIG.json``: a kohya / LoRA_Easy config as a Hydra experiment.

The importer lives in ``sweeper.kohya_import``; this module is the command's name.
"""

import sys

from sweeper.kohya_import import (
    ImportResult,
    UnreadableConfig,
    experiment_name,
    import_config,
    main,
    write_experiment,
    yaml_value,
)

__all__ = ["ImportResult", "UnreadableConfig", "experiment_name", "import_config", "main", "write_experiment"]
__all__ += ["yaml_value"]

if __name__ == "__main__":
    sys.exit(main())
