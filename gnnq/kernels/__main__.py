"""``python -m gnnq.kernels``: build the C++ CPU extensions into the kernel cache now, rather
than in the first job that needs them (``make install`` runs it). Never fails: without a
compiler the runner trains with PyTorch's ops and ``gnnq bench`` says what is missing."""

from gnnq.kernels import cpu


def main() -> None:
    packed = cpu.available()  # logs why not
    fused = cpu.training_ops() is not None
    print(f"gnnq kernels in {cpu.cache_dir()}: packed CPU kernels "
          f"{'ready' if packed else 'not built'}, fused training ops "
          f"{'ready' if fused else 'not built (PyTorch ops used)'}")


if __name__ == "__main__":
    main()
