"""Raw samples out of webdataset tar shards, read strictly.

webdataset's layout: a sample is a run of consecutive files that share a key, the file's name
up to the first dot of its base name (``part/000123.jpg`` and ``part/000123.txt`` make the
sample ``part/000123`` with the extensions ``jpg`` and ``txt``). A raw sample is a dict of
bytes by lower-cased extension, with ``__key__`` and ``__url__``.

webdataset's own reader takes whatever a shard gives. Python's tarfile, in the stream mode it
reads with, ends an archive quietly where its stream stops at a header, so a shard cut short
at a block boundary (a copy interrupted, a connection dropped) reads as complete; and files of a
sample that are not adjacent (a tar made from an unsorted folder) become fragments, an image
here and its caption there, each dropped as a sample without a caption or an image, so a run
trains on the few pairs that happen to lie side by side and says nothing. Here a shard that ends
without tar's end-of-archive marker has failed, like one whose stream broke, and one whose
layout webdataset cannot group stops with a message that says why.
"""

import contextlib
import re
import tarfile

from webdataset.gopen import gopen

# A legitimate sample has a few files.
MAX_FILES_PER_SAMPLE = 64
# webdataset's metadata files, which are not samples.
METADATA = re.compile(r"__[^/]*__($|/)")


class CutShort(tarfile.ReadError):
    """A shard's stream ended without tar's end-of-archive marker."""


class LayoutError(ValueError):
    """A shard whose files webdataset cannot group into samples."""


class MarkedEndTarInfo(tarfile.TarInfo):
    """Notes on its archive whether a header read was tar's end-of-archive marker (a block of
    zeros). tarfile's stream mode ends the archive alike at that marker, at the end of the
    stream and at a header cut short or damaged; only the first is a complete shard."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.end_marker_read = True
            raise


def tar_files(stream):
    """``(name, bytes)`` of each regular file in the tar ``stream``, webdataset's metadata aside;
    ``CutShort`` where the stream ends before the end-of-archive marker."""
    archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=MarkedEndTarInfo)
    for member in archive:
        if member.isreg() and not METADATA.match(member.name):
            yield member.name, archive.extractfile(member).read()
        archive.members = []  # the stream mode would keep every header it read
    if not getattr(archive, "end_marker_read", False):
        raise CutShort("the shard ends without tar's end-of-archive marker: cut short, or a header is damaged")


def key_and_extension(name: str):
    """``(key, extension)`` as webdataset splits a file name, the extension lower-cased; ``None``
    for a name without a dot in its base name, which no sample takes, or starting with one (a
    hidden file, which webdataset files under its folder's name as the key)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return f"{folder}/{stem}" if folder else stem, extension.lower()


def grouped_samples(files, url: str, on_failure, on_duplicate):
    """Raw samples of ``(name, bytes)`` files: consecutive files with one key make one sample; a
    file a sample already holds is left out, after ``on_duplicate()``. Where ``files`` fail (the
    stream), or the layout is one webdataset cannot group, reading stops after
    ``on_failure(error)`` is told. Such a layout (``LayoutError``): a key that comes back with a
    file its earlier run lacked, a sample's files apart (a key that comes back with the same
    files is a sample written twice, and read so), or a sample of over ``MAX_FILES_PER_SAMPLE``
    files (names with dots in the key)."""
    earlier_runs = {}  # key -> the extensions of its earlier run in this shard
    layouts = {}  # each set of extensions once: most samples of a shard have the same
    sample, files = None, iter(files)
    while True:
        try:
            name, data = next(files)
        except StopIteration:
            break
        except Exception as error:  # noqa: BLE001 - whatever broke the stream, this shard ends here
            on_failure(error)
            # The sample being read goes on as read so far, as webdataset's reader has it (one that
            # lacks a file is dropped downstream).
            if sample is not None:
                yield sample
            return
        split = key_and_extension(name)
        if split is None:
            continue
        key, extension = split
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                extensions = frozenset(sample).difference(("__key__", "__url__"))
                earlier_runs[sample["__key__"]] = layouts.setdefault(extensions, extensions)
                yield sample
            sample = {"__key__": key, "__url__": url}
        if extension in sample:
            on_duplicate()
            continue
        if extension not in earlier_runs.get(key, (extension,)):
            on_failure(LayoutError(
                f"the files of sample {key} are not adjacent ({name} comes after other samples' files): webdataset "
                "groups only consecutive files, so write each sample's files together (tar --sort=name, or "
                "webdataset's TarWriter)"))
            return
        if len(sample) - 2 >= MAX_FILES_PER_SAMPLE:
            on_failure(LayoutError(
                f"sample {key} has over {MAX_FILES_PER_SAMPLE} files ({name}): webdataset takes a sample's key up "
                "to the first dot of a file name, so names such as a.b.jpg make one sample of every file starting "
                "with a.; rename them without dots in the key"))
            return
        sample[extension] = data
    if sample is not None:
        yield sample


def shard_samples(url: str, on_failure, on_duplicate):
    """The raw samples of the shard at ``url`` (a path, a URL or a ``pipe:`` command), in order
    (``grouped_samples``), up to where its stream cannot be opened or read to its end (``CutShort``
    among others) or its layout cannot be grouped (``LayoutError``): there ``on_failure(error)``
    is told, and after a failed stream the sample being read comes as far as it was read."""
    try:
        stream = gopen(url)
    except Exception as error:  # noqa: BLE001 - a missing file, a command that cannot start
        on_failure(error)
        return
    try:
        yield from grouped_samples(tar_files(stream), url, on_failure, on_duplicate)
    finally:
        # A pipe: command left early (a layout error, a reader moving on) may be waiting on its
        # network rather than writing into the closed pipe, and closing waits for it to exit.
        process = getattr(stream, "proc", None)
        if process is not None and process.poll() is None:
            process.kill()
        with contextlib.suppress(OSError):  # webdataset reports the command's exit status on closing
            stream.close()
