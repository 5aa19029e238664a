from mlxbatch.cli import main

main()
