"""Running training: the loop over an activation stream (`loop.fit`, with checkpoints, resampling
and signal handling), streamed evaluation (`loop.evaluate`) and the metric hooks."""
