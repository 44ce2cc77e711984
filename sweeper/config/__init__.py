"""The config: typed schemas registered with Hydra (schema.py), the command line's keys checked
before Hydra composes (cli_overrides.py), and every startup check of a composed config
(validate.py, schema_check.py, versions.py), with the eval prompts and concept it implies."""
