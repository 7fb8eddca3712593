"""A GCS JSON API on 127.0.0.1 for the tests: `python tests/gcs_emulator.py PORT` serves an
in-memory bucket named "bucket" until killed.

It is the `gcp-storage-emulator` package with one thing added: the `x-goog-generation` header on
object responses, which the real service sends and TensorStore's GCS driver needs to read an
object's generation (Orbax's OCDBT manifest is updated by read-modify-write; without the header
every save fails with "Malformed StorageGeneration"). The emulator ignores write preconditions
(`ifGenerationMatch`), so a race between two creators is not tested here; one run after another is.

`environment(port)` gives the variables that point gcsfs (`STORAGE_EMULATOR_HOST`, anonymous) and
TensorStore (`TENSORSTORE_GCS_HTTP_URL`, with a fake token instead of Google credentials) at it.
"""
import sys
import time


def environment(port: int) -> dict[str, str]:
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test",
          # Anonymous gcsfs (no credential lookup, no "bucket type" probe) and plain JSON API
          # (the zonal/HNS probe retries over gRPC, which the emulator does not serve).
          "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _with_generation(handler):
  def wrapped(request, response, storage, *args, **kwargs):
    handler(request, response, storage, *args, **kwargs)
    params = getattr(request, "params", None) or {}
    if "object_id" in params and "x-goog-generation" not in response._headers:  # pylint: disable=protected-access
      try:
        obj = storage.get_file_obj(params["bucket_name"], params["object_id"])
      except Exception:  # pylint: disable=broad-except  # Absent: nothing to say.
        return
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return wrapped


def serve(port: int) -> None:
  import logging  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  logging.disable(logging.CRITICAL)
  server.HANDLERS = tuple(
      (regex, {method: _with_generation(h) for method, h in handlers.items()})
      for regex, handlers in server.HANDLERS)
  emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
  emulator.start()
  print("ready", flush=True)
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  serve(int(sys.argv[1]))
