from dejavu.cli import main

main()
