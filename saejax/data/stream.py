"""Activation streams: images -> a sharded, jitted harvest of one or more layers -> SAE batches.

`ActivationStream` is what an SAE trains on. It reads images from a `saejax.data` source (on
every process its own share), runs the backbone over the mesh with the batch split over
`data`, and mixes the tokens of many images in a device-resident `ShuffleBuffer` that never
leaves its devices. It is double-buffered: while one fill is read, the forward passes of the
next are dispatched between the training steps, and a host thread decodes, preprocesses and
transfers the next images, so the device does not wait on the host.

>>> stream = ActivationStream(bb, bb_params, source, layers=(10,), batch_size=4096,
...                           image_batch_size=64, buffer_tokens=2**16, key=jax.random.key(0))
>>> x = next(stream)[10]        # [4096, 768], split over the mesh's `data` axis
>>> position = stream.position()  # save it; ActivationStream(..., position=position) resumes

The stream is a pure function of (source, seed, key, sizes, groups): batch t is the same
whatever the mesh, and a stream rebuilt from `position()` continues with exactly the batches
that followed.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from saejax import data
from saejax.data import activations
from saejax import sharding as shd
from saejax.core.normalization import Normalization, estimate_normalization

__all__ = ["ActivationStream", "activation_batches", "estimate_layer_normalization"]


class _Prefetcher:
    """Image batches decoded, preprocessed and put on the devices by a host thread, `depth`
    ahead of the consumer. Errors surface in the consumer, with the batch they came from."""

    _DONE = object()

    def __init__(self, batches: Iterator[data.Batch], put, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(batches, put), daemon=True,
                                        name="saejax-stream-prefetch")
        self._thread.start()

    def _run(self, batches, put):
        try:
            for batch in batches:
                item = (put(batch), batch.position)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._DONE)
        except BaseException as e:  # handed to the consumer
            self._queue.put(e)

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass


def _device_images(bb, mesh: Mesh):
    """host Batch -> (images [B, S, S, 3], image ids [B]) global arrays split over `data`,
    from this process's share (`jax.make_array_from_process_local_data`)."""
    images_sharding, ids_sharding = shd.batch_sharding(mesh, 4), shd.batch_sharding(mesh, 1)

    def put(batch: data.Batch):
        pixels = np.asarray(bb.preprocess(batch.images), np.dtype(bb.dtype))
        images = jax.make_array_from_process_local_data(images_sharding, pixels)
        ids = jax.make_array_from_process_local_data(ids_sharding, batch.ids.astype(np.int32))
        return images, ids

    return put


def _per_process(global_batch: int, mesh: Mesh, what: str) -> int:
    count, devices = jax.process_count(), shd.data_size(mesh)
    if global_batch % devices or global_batch % count:
        raise ValueError(f"{what}={global_batch} must be a multiple of the mesh's data axis ({devices} devices) "
                         f"and of the number of processes ({count})")
    return global_batch // count


class ActivationStream:
    """Batches of (normalised) activations, one `[batch_size, D]` array per layer.

    Args:
        bb: a backbone from `saejax.backbones.load`.
        bb_params: its parameters (replicated over the mesh here).
        source: a `saejax.data` source of uint8 images.
        layers: hook indices (residual after block i); one forward pass feeds all of them.
        batch_size: rows per SAE batch (global, over all devices and processes).
        image_batch_size: images per forward pass (global).
        buffer_tokens: rows mixed per fill (rounded down to whole forward passes). Two fills
            are held on device at once (`2 * buffer_tokens * len(layers) * D` values).
        tokens: token set ("patches", "cls", "registers", "all").
        normalization: `{layer: Normalization}` applied to each batch, or None for raw rows.
        mesh: the device mesh (default: every device on `data`).
        key: `jax.random.key` of the buffer shuffles (fill f uses `fold_in(key, f)`).
        seed: the image order seed (`saejax.data.batches`).
        groups: buffer groups (`ShuffleBuffer`); default the mesh's `data` size. Fix it to
            get the same stream on meshes of different sizes (it must be a multiple of each).
        position: a `position()` dict to resume from.
        prefetch: image batches prepared ahead by the host thread.

    Raises:
        ValueError: sizes that do not divide (named), or a position made with other groups.
    """

    def __init__(self, bb, bb_params, source: data.Source, *, layers: Sequence[int], batch_size: int,
                 image_batch_size: int, buffer_tokens: int, key: jax.Array, tokens: str = "patches",
                 normalization: Mapping[int, Normalization] | None = None, mesh: Mesh | None = None,
                 seed: int = 0, groups: int | None = None, position: Mapping[str, int] | None = None,
                 prefetch: int = 2):
        self.mesh = shd.make_mesh() if mesh is None else mesh
        self.layers = tuple(sorted(int(i) for i in layers))
        self.bb, self.source, self.key, self.seed, self.prefetch = bb, source, key, seed, prefetch
        self.batch_size, self.image_batch_size = int(batch_size), int(image_batch_size)
        self.groups = shd.data_size(self.mesh) if groups is None else int(groups)
        self._images_per_process = _per_process(self.image_batch_size, self.mesh, "image_batch_size")
        self._harvest = activations.make_harvest(bb, self.layers, tokens=tokens, mesh=self.mesh)
        self._bb_params = jax.device_put(bb_params, shd.replicated(self.mesh))
        rows_per_pass = self.image_batch_size * len(activations.token_indices(bb.layout, tokens))
        capacity = max(1, buffer_tokens // rows_per_pass) * rows_per_pass
        for name, value in (("rows per forward pass (image_batch_size x tokens)", rows_per_pass),
                            ("batch_size", self.batch_size)):
            if value % self.groups:
                raise ValueError(f"{name} = {value} does not split over groups={self.groups}")
        if capacity < self.batch_size:
            raise ValueError(f"buffer_tokens={buffer_tokens} holds fewer rows than one batch ({self.batch_size}); "
                             f"raise buffer_tokens")
        self.passes_per_fill = capacity // rows_per_pass
        self.batches_per_fill = capacity // self.batch_size
        row_shape = (len(self.layers), bb.d_model)
        self._buffers = [activations.ShuffleBuffer.create(capacity, row_shape, groups=self.groups, dtype=bb.dtype,
                                                          mesh=self.mesh) for _ in range(2)]
        layers_ = self.layers

        def push(buf, harvest):
            rows = jnp.stack([harvest.acts[i] for i in layers_], axis=1)
            return activations.push(buf, rows, harvest.image_ids, harvest.token_ids)

        norm = None if normalization is None else {i: normalization[i] for i in self.layers}

        def take(buf):
            buf, batch = activations.take(buf, self.batch_size)
            rows = batch.acts[0]
            return buf, {i: rows[:, j] if norm is None else norm[i].apply(rows[:, j]) for j, i in enumerate(layers_)}

        self._push = jax.jit(push, donate_argnums=0)
        self._shuffle = jax.jit(activations.shuffle, donate_argnums=0)
        self._take = jax.jit(take, donate_argnums=0)

        position = dict(position or {})
        if position.get("groups", self.groups) != self.groups:
            raise ValueError(f"the position was made with groups={position['groups']}, this stream has "
                             f"groups={self.groups}: pass groups={position['groups']} to continue the same stream")
        self.fill_index = int(position.get("fill_index", 0))
        self.fill_start = int(position.get("fill_start", 0))
        self.taken = int(position.get("taken", 0))
        self._images = _Prefetcher(
            data.batches(source, self._images_per_process, seed=seed, start=self.fill_start,
                         process_index=jax.process_index(), process_count=jax.process_count()),
            _device_images(bb, self.mesh), depth=prefetch)
        # The fill being read (rebuilt whole, then `taken` batches skipped) and the next one.
        self._reading, self._filling = self._buffers
        for _ in range(self.passes_per_fill):
            self._reading = self._push_one(self._reading)
        self.next_fill_start = self._last_position
        self._reading = self._shuffle(self._reading, jax.random.fold_in(key, self.fill_index))
        self._reading = self._reading.replace(read=jnp.asarray(self.taken * (self.batch_size // self.groups),
                                                               jnp.int32))
        self._filling = self._filling.clear()
        self._filled_passes = 0

    def _push_one(self, buf):
        (images, ids), self._last_position = next(self._images)
        return self._push(buf, self._harvest(self._bb_params, images, ids))

    def __iter__(self) -> ActivationStream:
        return self

    def __next__(self) -> dict[int, jax.Array]:
        """The next batch: `{layer: [batch_size, D]}`, split over `data`. Never blocks on the
        device; it blocks on the host only when the image pipeline falls behind."""
        if self.taken == self.batches_per_fill:
            while self._filled_passes < self.passes_per_fill:
                self._filling = self._push_one(self._filling)
                self._filled_passes += 1
            self.fill_index += 1
            self.fill_start, self.next_fill_start = self.next_fill_start, self._last_position
            filled = self._shuffle(self._filling, jax.random.fold_in(self.key, self.fill_index))
            self._reading, self._filling = filled, self._reading.clear()
            self.taken, self._filled_passes = 0, 0
        # Dispatch the next fill's forward passes in step with the batches read from this one.
        due = -(-(self.taken + 1) * self.passes_per_fill // self.batches_per_fill)
        while self._filled_passes < due:
            self._filling = self._push_one(self._filling)
            self._filled_passes += 1
        self._reading, batch = self._take(self._reading)
        self.taken += 1
        return batch

    def position(self) -> dict[str, int]:
        """Where the stream is: pass it back as `position=` to continue after the last batch."""
        return {"fill_index": self.fill_index, "fill_start": self.fill_start, "taken": self.taken,
                "groups": self.groups}

    def close(self) -> None:
        """Stop the host thread (it also stops with the process)."""
        self._images.close()


def activation_batches(bb, bb_params, source: data.Source, *, layers: Sequence[int], image_batch_size: int,
                       tokens: str = "patches", mesh: Mesh | None = None, seed: int | None = None,
                       epochs: int | None = 1) -> Iterator[dict[int, jax.Array]]:
    """Raw activations image batch by image batch, with no buffer: `{layer: [B * T, D]}`.

    `seed=None` reads the source in index order. Used for normalisation statistics and
    evaluation; the last incomplete image batch is dropped.
    """
    mesh = shd.make_mesh() if mesh is None else mesh
    harvest = activations.make_harvest(bb, layers, tokens=tokens, mesh=mesh)
    params = jax.device_put(bb_params, shd.replicated(mesh))
    put = _device_images(bb, mesh)
    per_process = _per_process(image_batch_size, mesh, "image_batch_size")
    for batch in data.batches(source, per_process, seed=seed, shuffle=seed is not None, epochs=epochs,
                              drop_remainder=True, process_index=jax.process_index(),
                              process_count=jax.process_count()):
        images, ids = put(batch)
        yield harvest(params, images, ids).acts


def _gather_rows(x: jax.Array, rows: jax.Array) -> np.ndarray:
    """`x[rows]` on the host, also when `x` is split over several processes."""
    mesh = getattr(x.sharding, "mesh", None)
    if mesh is None:
        return np.asarray(x[rows])
    return np.asarray(jax.jit(lambda x, r: x[r], out_shardings=shd.replicated(mesh))(x, rows))


def estimate_layer_normalization(batches: Iterator[dict[int, jax.Array]], n_samples: int,
                                 key: jax.Array) -> dict[int, Normalization]:
    """`{layer: Normalization}` from `n_samples` rows per layer, drawn at random from a stream
    of `{layer: [N, D]}` batches (at most half of each batch, so the sample spans many).

    Raises:
        ValueError: the stream ended first.
    """
    collected: dict[int, list] = {}
    have = 0
    for i, acts in enumerate(batches):
        n = next(iter(acts.values())).shape[0]
        take_n = min(max(1, n // 2), n_samples - have)
        rows = jax.random.choice(jax.random.fold_in(key, i), n, (take_n,), replace=False)
        for layer, x in acts.items():
            collected.setdefault(layer, []).append(_gather_rows(x, rows))
        have += take_n
        if have >= n_samples:
            return {layer: estimate_normalization(np.concatenate(xs)) for layer, xs in collected.items()}
    raise ValueError(f"the activation stream ended after {have} rows; {n_samples} were asked for")
