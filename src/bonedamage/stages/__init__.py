"""One module per ``bonedamage`` command, named after it: ``dvc.yaml`` stage ``train_cnn`` runs
``bonedamage train-cnn``, whose code is ``stages/train_cnn.py`` (``run_train_cnn``). synth,
ingest, predict and gate are the commands outside ``dvc.yaml``'s stages. Each module
declares the ``params.yaml`` sections it reads (``PARAMS``) and can read no other."""
