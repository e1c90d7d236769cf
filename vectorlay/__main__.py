from vectorlay.cli import main

main()
