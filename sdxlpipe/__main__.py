from sdxlpipe.cli import main

# Guarded: decode workers are spawned, and a spawned process imports __main__ again.
if __name__ == "__main__":
    main()
