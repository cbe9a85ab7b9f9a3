from sdxlpipe.cli import main

main()
