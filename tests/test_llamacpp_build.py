"""The cached llama.cpp build is used only when it was built with today's flags."""
from quantbench.runtimes import llamacpp


def test_a_cached_build_without_todays_flags_is_rebuilt(tmp_path, monkeypatch):
    """A build from before the AMX fix (no BUILD tag, or another one) is not found, so
    ``ensure`` builds again; the tagged build is found. The tag turns AMX off on x86-64
    (VMs can report AMX tiles their kernel never enabled: ggml's AMX kernels then SIGILL)."""
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv(llamacpp.ENV, raising=False)
    bin_dir = llamacpp.install_dir() / "bin"
    bin_dir.mkdir(parents=True)
    for tool in llamacpp.TOOLS:
        (bin_dir / tool).write_text("")
    assert llamacpp.find() is None
    (bin_dir / llamacpp.BUILD_FILE).write_text("native\n")
    assert llamacpp.find() is None
    (bin_dir / llamacpp.BUILD_FILE).write_text(llamacpp.BUILD_TAG + "\n")
    assert llamacpp.find().bin_dir == bin_dir
    if llamacpp.platform.machine().lower() in ("x86_64", "amd64"):
        assert "-mno-amx-int8" in llamacpp.BUILD_TAG
