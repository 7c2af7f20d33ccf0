"""The one exception raised for every unreadable, unsafe or mismatched checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint could not be read: missing, corrupt, unsafe, or not the expected shape.

    The message always names the file and says what was wrong with it, e.g.
    ``"/ckpt/sae.pt: state_dict is missing key 'b_dec'"``. A function that raises it has
    loaded nothing: there is no partial result.
    """
