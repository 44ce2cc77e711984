from training.library_notices import quiet_torchao_import_notices

quiet_torchao_import_notices()  # before any diffusers model import brings torchao in
