from mnp.cli import main

main()
