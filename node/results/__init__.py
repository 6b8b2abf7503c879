"""Result writers, one module per kind of object: DICOM SEG (:mod:`.seg`), TID 1500 SR
(:mod:`.sr`), the PDF report (:mod:`.pdf_report`) and its Encapsulated PDF instance
(:mod:`.encapsulated_pdf`), key images (:mod:`.key_images`); the patient, study and
equipment attributes every derived instance shares (:mod:`.derived`)."""
