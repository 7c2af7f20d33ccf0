"""The ml_collections configs the commands read (`saejax COMMAND --config=NAME[:small]`). Each
file's docstring gives the command to run and the numbers to expect; `paper` holds the pieces the
paper-reproduction configs share. Read a config in Python with
`saejax.configs.clip_vit_b16.get_config("small")`."""
