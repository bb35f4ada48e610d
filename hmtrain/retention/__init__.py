"""The information-retention probe (Badger 2026, `hmtrain eval retention`): frozen encoders turn windows of
tokens into vectors, and a fresh decoder, trained here, tries to get each window back from its vector."""
